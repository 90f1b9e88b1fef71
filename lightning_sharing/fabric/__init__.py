"""fabric layer (see docs/architecture.md)."""
