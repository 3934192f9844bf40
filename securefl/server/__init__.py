"""securefl.server."""
