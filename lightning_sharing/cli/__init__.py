"""``lightning-sharing``: check, describe and export checkpoints from the command line.

    lightning-sharing verify PATH [--size-only]     # exit 0 if intact, 1 if not, 2 if PATH is no checkpoint
    lightning-sharing inspect PATH [--files]        # the manifest as a table; SHARDED chunks per rank
    lightning-sharing export CKPT OUT [--component model] [--dtype bfloat16] [--max-shard-size 5GB]

Example:
    >>> main(["verify", "runs/step=500.ckpt"])   # doctest: +SKIP
    0
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from typing import Any

from rich.console import Console

from lightning_sharing.cli import export as export_command
from lightning_sharing.cli.inspect import run_inspect
from lightning_sharing.cli.verify import Problem, run_verify, verify_checkpoint
from lightning_sharing.errors import CheckpointError, ComponentDeclarationError, ManifestError

__all__ = ["Problem", "main", "verify_checkpoint"]


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``lightning-sharing`` console script."""
    parser = argparse.ArgumentParser(prog="lightning-sharing", description="Check, describe and export checkpoints.")
    commands = parser.add_subparsers(dest="command", required=True)
    verify = commands.add_parser("verify", help="check sizes, checksums and manifest consistency")
    verify.add_argument("path")
    verify.add_argument("--size-only", action="store_true", help="compare sizes only (fast, misses bit flips)")
    inspect = commands.add_parser("inspect", help="print the manifest as a table")
    inspect.add_argument("path")
    inspect.add_argument("--files", action="store_true", help="also list every file")
    export = commands.add_parser("export", help="write a component's full tensors as Hugging Face sharded safetensors")
    export_command.add_arguments(export)
    for command in (verify, inspect, export):
        command.add_argument("--storage-options", type=_json_object, default=None, metavar="JSON",
                             help="fsspec options for a URL PATH, e.g. '{\"endpoint_url\": \"http://...\"}'")
    args = parser.parse_args(argv)
    console = Console(width=160)
    run = {"verify": run_verify, "inspect": run_inspect, "export": export_command.run_export}[args.command]
    try:
        return run(args, console)
    except ManifestError as exc:
        console.print(f"ERROR: {exc}", markup=False)
        return 2
    except CheckpointError as exc:
        if args.command == "export":  # a damaged checkpoint, a bad option, an occupied output directory
            console.print(f"ERROR: {exc}", markup=False)
            return 1
        if isinstance(exc, ComponentDeclarationError):  # e.g. a URL of a protocol no backend serves
            console.print(f"ERROR: {exc}", markup=False)
            return 2
        console.print(f"ERROR: cannot read {args.path}: {type(exc).__name__}: {exc}", markup=False)
        return 2
    except OSError as exc:  # the store could not be read: nothing was checked
        console.print(f"ERROR: cannot read {args.path}: "
                      f"{type(exc).__name__}: {exc}", markup=False)
        return 2


def _json_object(text: str) -> dict[str, Any]:
    try:
        value = json.loads(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"not JSON: {exc}") from exc
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError("must be a JSON object")
    return value


if __name__ == "__main__":
    sys.exit(main())
