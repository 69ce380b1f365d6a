"""Web-search backend plugins (the `register_search_backends` hook)."""
