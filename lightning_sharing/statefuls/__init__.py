"""statefuls layer (see docs/architecture.md)."""
