"""What the Trainer and Fabric adapters share: Lightning's private API (compat), process-group cleanup, data
loader helpers, and the checkpointing plumbing common to both strategies (common)."""

#: Marks the strategy factories registered before the adapters are imported (kept here, in the package's
#: face, so that registering them imports nothing heavy: ``import lightning_sharing`` stays fast).
LAZY_FLAG = "__lightning_sharing_lazy__"
