"""Types, catalog, errors and the status machine; imports nothing else of the project."""
