"""``lightning-sharing export CKPT OUT [--component model] [--dtype bfloat16] [--max-shard-size 5GB] [--prefix P]``.

Writes the component's full tensors (SHARDED chunks assembled) into ``OUT`` as Hugging Face sharded
safetensors with ``model.safetensors.index.json``, one tensor at a time (see
``lightning_sharing.engine.export``); for a component that wraps a ``transformers`` model, also ``config.json``,
with keys that ``from_pretrained`` loads.

Example:
    >>> from lightning_sharing.cli import main
    >>> main(["export", "runs/step=500.ckpt", "runs/hf", "--dtype", "bfloat16"])   # doctest: +SKIP
"""

from __future__ import annotations

import argparse

from rich.console import Console

from lightning_sharing.cli.verify import byte_progress, human_size
from lightning_sharing.engine.export import export_checkpoint

__all__ = ["run_export"]


def run_export(args: argparse.Namespace, console: Console) -> int:
    """The ``export`` command: write the files (a progress bar on a terminal), print what was written; 0 on success."""
    with byte_progress(console, "exporting") as advance:
        result = export_checkpoint(args.path, args.out, component=args.component, dtype=args.dtype,
                                   max_shard_size=args.max_shard_size, storage_options=args.storage_options,
                                   prefix=args.prefix, progress=advance)
    config = " + config.json" if (result.path / "config.json").is_file() else ""
    console.print(f"exported component {args.component!r} of {args.path} to {result.path}: {result.tensors} tensors, "
                  f"{human_size(result.total_size)} in {len(result.files)} file(s) + model.safetensors.index.json"
                  f"{config}", markup=False)
    return 0
