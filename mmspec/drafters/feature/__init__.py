"""Feature-level drafters (EAGLE family)."""
