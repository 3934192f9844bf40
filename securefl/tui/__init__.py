"""securefl.tui."""
