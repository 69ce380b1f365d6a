"""The inference engine: scheduler, KV cache, model runner, sampling."""
