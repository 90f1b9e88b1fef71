"""distributed layer (see docs/architecture.md)."""
