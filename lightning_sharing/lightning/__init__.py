"""lightning layer (see docs/architecture.md)."""
