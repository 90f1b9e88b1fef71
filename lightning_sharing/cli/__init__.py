"""``lightning-sharing``: check, describe and export checkpoints from the command line.

    lightning-sharing verify PATH [--size-only] [--json]   # exit 0 if intact, 1 if not, 2 if PATH is no checkpoint
    lightning-sharing inspect PATH [--files] [--json]      # the manifest as a table; SHARDED chunks per rank
    lightning-sharing export CKPT OUT [--component model] [--dtype bfloat16] [--max-shard-size 5GB] [--prefix P]
    lightning-sharing --version

Only the parser is built before a command runs: torch and the package's engine are imported by the
command itself, so ``--help`` and ``--version`` answer at once. Tables follow the terminal's width (or
``COLUMNS``); progress bars are drawn only when stdout is a terminal, never into a pipe; ``--json``
prints one JSON document for scripts instead of tables.

Example:
    >>> main(["verify", "runs/step=500.ckpt"])   # doctest: +SKIP
    0
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence
from typing import Any

from lightning_sharing._version import __version__

__all__ = ["Problem", "main", "verify_checkpoint"]

# Where stdout is no terminal and COLUMNS is unset: wide enough that logs keep a table row on one line.
_PIPED_WIDTH = 160


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lightning-sharing", description="Check, describe and export checkpoints.")
    parser.add_argument("--version", action="version", version=f"lightning-sharing {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)
    verify = commands.add_parser("verify", help="check sizes, checksums and manifest consistency")
    verify.add_argument("path")
    verify.add_argument("--size-only", action="store_true", help="compare sizes only (fast, misses bit flips)")
    inspect = commands.add_parser("inspect", help="print the manifest as a table")
    inspect.add_argument("path")
    inspect.add_argument("--files", action="store_true", help="also list every file")
    export = commands.add_parser("export", help="write a component's full tensors as Hugging Face sharded safetensors")
    export.add_argument("path", help="the checkpoint")
    export.add_argument("out", help="the output directory (created; an earlier export there is replaced)")
    export.add_argument("--component", default="model", help="the component to export (default: model)")
    export.add_argument("--dtype", default=None, help="cast floating-point tensors, e.g. bfloat16")
    export.add_argument("--max-shard-size", default="5GB", help="largest output file, e.g. 5GB, 500MB (default 5GB)")
    export.add_argument("--prefix", default=None,
                        help="taken off the tensor names, tensors outside it left out (default: the prefix of the "
                             "transformers model found at save, e.g. 'model.'; '' keeps the names as saved)")
    for command in (verify, inspect):
        command.add_argument("--json", action="store_true", help="print one JSON document instead of tables")
    for command in (verify, inspect, export):
        command.add_argument("--storage-options", type=_json_object, default=None, metavar="JSON",
                             help="fsspec options for a URL PATH, e.g. '{\"endpoint_url\": \"http://...\"}'")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``lightning-sharing`` console script."""
    args = _parser().parse_args(argv)
    from rich.console import Console

    from lightning_sharing.errors import CheckpointError, ComponentDeclarationError, ManifestError

    piped = not sys.stdout.isatty() and "COLUMNS" not in os.environ
    console = Console(width=_PIPED_WIDTH if piped else None)
    try:
        return _run(args, console)
    except ManifestError as exc:
        return _fail(args, console, f"{exc}", 2)
    except CheckpointError as exc:
        if args.command == "export":  # a damaged checkpoint, a bad option, an occupied output directory
            return _fail(args, console, f"{exc}", 1)
        if isinstance(exc, ComponentDeclarationError):  # e.g. a URL of a protocol no backend serves
            return _fail(args, console, f"{exc}", 2)
        return _fail(args, console, f"cannot read {args.path}: {type(exc).__name__}: {exc}", 2)
    except OSError as exc:  # the store could not be read: nothing was checked
        return _fail(args, console, f"cannot read {args.path}: {type(exc).__name__}: {exc}", 2)


def _run(args: argparse.Namespace, console: Any) -> int:
    if args.command == "verify":
        from lightning_sharing.cli.verify import run_verify

        return run_verify(args, console)
    if args.command == "inspect":
        from lightning_sharing.cli.inspect import run_inspect

        return run_inspect(args, console)
    from lightning_sharing.cli.export import run_export

    return run_export(args, console)


def _fail(args: argparse.Namespace, console: Any, message: str, code: int) -> int:
    if getattr(args, "json", False):
        print(json.dumps({"path": args.path, "ok": False, "error": message}))
    else:
        console.print(f"ERROR: {message}", markup=False)
    return code


def __getattr__(name: str) -> Any:
    # ``verify_checkpoint`` / ``Problem`` are the verifier's Python API; imported when first used (PEP 562).
    if name in ("Problem", "verify_checkpoint"):
        from lightning_sharing.cli import verify

        return getattr(verify, name)
    raise AttributeError(f"module 'lightning_sharing.cli' has no attribute {name!r}")


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
