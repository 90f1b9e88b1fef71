"""What the Trainer and Fabric adapters share: Lightning's private API (compat), process-group cleanup, data
loader helpers, and the checkpointing plumbing common to both strategies (common)."""
