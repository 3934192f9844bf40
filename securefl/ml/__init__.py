"""securefl.ml."""
