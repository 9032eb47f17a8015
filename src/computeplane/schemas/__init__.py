"""Wire models: the JSON that crosses the public API and the internal agent API."""
