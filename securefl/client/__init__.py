"""securefl.client."""
