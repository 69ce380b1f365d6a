"""First-party mistralrs plugins. Each module is registered as its own entry point in the
``mistralrs`` group (see pyproject.toml); importing one must stay cheap (no torch)."""
