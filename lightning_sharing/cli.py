"""``lightning-sharing``: check and describe checkpoints from the command line.

    lightning-sharing verify PATH [--size-only]   # exit 0 if intact, 1 if not, 2 if PATH is no checkpoint
    lightning-sharing inspect PATH                # the manifest as a table

PATH is a local path or an fsspec URL (``s3://bucket/run/step=5.ckpt``). Credentials and endpoints come the
ordinary way (for S3: ``AWS_ENDPOINT_URL``, ``AWS_ACCESS_KEY_ID``, ... or a profile), or as JSON in
``--storage-options '{"endpoint_url": "..."}'`` (passed to fsspec). A store that cannot be read (no
credentials, no such bucket) is exit 2 too, with the store's error.

``verify`` checks every file the manifest lists (present, a regular file inside the checkpoint, its
size and its checksum), that no unlisted file is present, that every listed name is one the format
writes, and that each safetensors index points only at listed shards. It reports every problem with
the component, the file and the rank that wrote it.
"""

from __future__ import annotations

import argparse
import json
import os
import posixpath
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from lightning_sharing.core.options import VerifyMode
from lightning_sharing.engine.load_plan import check_listed_files
from lightning_sharing.errors import CheckpointError, ComponentDeclarationError, CorruptCheckpointError, ManifestError
from lightning_sharing.format.layout import parse_index
from lightning_sharing.format.manifest import CheckpointManifest
from lightning_sharing.storage import data_root, read_manifest, store_for, verify_entry

__all__ = ["Problem", "main", "verify_checkpoint"]


@dataclass(frozen=True)
class Problem:
    """One thing wrong with a checkpoint."""

    component: str
    file: str
    rank: int | None
    message: str


def verify_checkpoint(path: str | Path, mode: VerifyMode | str = VerifyMode.CHECKSUM,
                      storage_options: dict[str, Any] | None = None) -> tuple[CheckpointManifest, list[Problem]]:
    """Check a checkpoint without loading it; raises ``ManifestError`` if it has no valid manifest."""
    verify = VerifyMode.parse(mode)
    store = store_for(path, storage_options)
    root = store.normalize(os.fspath(path))
    manifest = read_manifest(store, root, display=os.fspath(path))
    root = data_root(store, root, manifest)
    problems: list[Problem] = []
    try:
        check_listed_files(store, root, manifest)
    except CorruptCheckpointError as exc:
        problems.append(Problem("-", "-", None, str(exc)))
    for key, component in manifest.components.items():
        listed = {entry.path for entry in component.files}
        for entry in component.files:
            try:
                location = verify_entry(store, root, entry, verify, key)
            except CorruptCheckpointError as exc:
                problems.append(Problem(key, entry.path, entry.rank, str(exc)))
                continue
            if entry.path.endswith(".safetensors.index.json"):
                problems.extend(_check_index(key, entry.path, entry.rank, store.read_bytes(location), listed))
    return manifest, problems


def _check_index(key: str, rel: str, rank: int, raw: bytes, listed: set[str]) -> list[Problem]:
    try:
        index = parse_index(raw, rel)
    except CheckpointError as exc:
        return [Problem(key, rel, rank, str(exc))]
    folder = posixpath.dirname(rel)
    missing = sorted({f for f in index["weight_map"].values()
                      if not isinstance(f, str) or posixpath.normpath(posixpath.join(folder, f)) not in listed})
    if missing:
        return [Problem(key, rel, rank, f"the index points to shards the manifest does not list: {missing[:5]}")]
    return []


def _human(size: int) -> str:
    value = float(size)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if value < 1024 or unit == "GiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{size} B"


def _verify(args: argparse.Namespace, console: Console) -> int:
    manifest, problems = verify_checkpoint(args.path, "size" if args.size_only else "checksum", args.storage_options)
    files = manifest.all_files()
    if not problems:
        what = "sizes" if args.size_only else "sizes and checksums"
        console.print(f"OK: {args.path}: {len(manifest.components)} components, {len(files)} files, "
                      f"{_human(sum(f.size for f in files))}; {what} match the manifest")
        return 0
    table = Table(title=f"{args.path}: {len(problems)} problem(s)", show_lines=True)
    for column in ("component", "file", "rank", "problem"):
        table.add_column(column, overflow="fold")
    for problem in problems:
        table.add_row(problem.component, problem.file, "-" if problem.rank is None else str(problem.rank),
                      problem.message)
    console.print(table)
    console.print(f"FAILED: {args.path} is damaged; do not resume from it")
    return 1


def _inspect(args: argparse.Namespace, console: Console) -> int:
    manifest = CheckpointManifest.load(args.path, args.storage_options)
    topology = manifest.topology
    console.print(f"{args.path}: step {manifest.step}, world size {manifest.world_size}, "
                  f"nodes {topology.get('nodes')}, groups {topology.get('groups') or '{}'}, "
                  f"saved {manifest.created_at} (format {manifest.format_version}, "
                  f"lightning_sharing {manifest.library_version or '?'}, torch {manifest.torch_version or '?'})")
    table = Table(show_lines=False)
    for column in ("component", "pattern", "group", "writer ranks", "files", "size", "validation"):
        table.add_column(column)
    for key, component in manifest.components.items():
        table.add_row(key, component.sharing_pattern.upper(), component.group_name or "-",
                      ",".join(str(r) for r in component.ranks), str(len(component.files)),
                      _human(component.size_bytes), component.validation)
    console.print(table)
    if manifest.data_prefix:
        console.print(f"files under {manifest.data_prefix}/ (this save's generation on an object store)")
    if args.files:
        files = Table(title="files")
        for column in ("path", "rank", "size", "checksum"):
            files.add_column(column)
        for entry in manifest.all_files():
            files.add_row(entry.path, str(entry.rank), str(entry.size), entry.checksum)
        console.print(files)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``lightning-sharing`` console script."""
    parser = argparse.ArgumentParser(prog="lightning-sharing", description="Check and describe checkpoints.")
    commands = parser.add_subparsers(dest="command", required=True)
    verify = commands.add_parser("verify", help="check sizes, checksums and manifest consistency")
    verify.add_argument("path")
    verify.add_argument("--size-only", action="store_true", help="compare sizes only (fast, misses bit flips)")
    inspect = commands.add_parser("inspect", help="print the manifest as a table")
    inspect.add_argument("path")
    inspect.add_argument("--files", action="store_true", help="also list every file")
    for command in (verify, inspect):
        command.add_argument("--storage-options", type=_json_object, default=None, metavar="JSON",
                             help="fsspec options for a URL PATH, e.g. '{\"endpoint_url\": \"http://...\"}'")
    args = parser.parse_args(argv)
    console = Console(width=160)
    try:
        return _verify(args, console) if args.command == "verify" else _inspect(args, console)
    except (ManifestError, ComponentDeclarationError) as exc:
        console.print(f"ERROR: {exc}", markup=False)
        return 2
    except (CheckpointError, OSError) as exc:  # the store could not be read: nothing was checked
        console.print(f"ERROR: cannot read {args.path}: {type(exc).__name__}: {exc}", markup=False)
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
