"""securefl.protocol."""
