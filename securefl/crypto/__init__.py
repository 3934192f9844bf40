"""securefl.crypto."""
