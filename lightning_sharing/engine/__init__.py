"""engine layer: a save (``save.py``: plan -> write -> agree -> commit) and a load (``load.py``: plan -> read ->
verify -> apply) over one copy-format interface (``copy_format.py``; ``whole_format.py``, ``chunk_format.py``,
chosen in ``formats.py``), driven by ``coordinator.CheckpointCoordinator`` (see docs/architecture.md)."""
