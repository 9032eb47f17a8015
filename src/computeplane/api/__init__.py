"""The HTTP API: routes, authentication and the mapping of errors to responses."""
