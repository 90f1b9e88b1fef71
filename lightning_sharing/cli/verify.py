"""``lightning-sharing verify PATH [--size-only] [--json]``: exit 0 if intact, 1 if not, 2 if PATH is no checkpoint.

PATH is a local path or an fsspec URL (``s3://bucket/run/step=5.ckpt``). Credentials and endpoints come the
ordinary way (for S3: ``AWS_ENDPOINT_URL``, ``AWS_ACCESS_KEY_ID``, ... or a profile), or as JSON in
``--storage-options '{"endpoint_url": "..."}'`` (passed to fsspec). A store that cannot be read (no
credentials, no such bucket) is exit 2 too, with the store's error.

``verify`` checks every file the manifest lists (present, a regular file inside the checkpoint, its
size and its checksum), that no unlisted file is present, that every listed name is one the format
writes, that each safetensors index points only at listed shards, and that each chunk index of a
SHARDED component parses and agrees with the manifest on every chunk file. It reports every problem
with the component, the file and the rank that wrote it. On a terminal a progress bar counts the bytes
checked; ``--json`` prints the verdict and every problem as one JSON document.

Example:
    >>> manifest, problems = verify_checkpoint("runs/step=500.ckpt")     # doctest: +SKIP
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import posixpath
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn, TransferSpeedColumn
from rich.table import Table

from lightning_sharing.checkpoint.manifest import CheckpointManifest, FileEntry, data_root, read_manifest
from lightning_sharing.checkpoint.reading import verify_entry
from lightning_sharing.core.options import VerifyMode
from lightning_sharing.core.rules import ChunkFiles, rule
from lightning_sharing.engine.load_plan import check_listed_files
from lightning_sharing.errors import CheckpointError, CorruptCheckpointError
from lightning_sharing.format.copy_files import parse_index
from lightning_sharing.sharded.index import ShardedIndex
from lightning_sharing.storage import store_for

__all__ = ["Problem", "byte_progress", "human_size", "run_verify", "verify_checkpoint"]


@dataclass(frozen=True)
class Problem:
    """One thing wrong with a checkpoint."""

    component: str
    file: str
    rank: int | None
    message: str


def verify_checkpoint(path: str | Path, mode: VerifyMode | str = VerifyMode.CHECKSUM,
                      storage_options: dict[str, Any] | None = None, *,
                      on_manifest: Callable[[CheckpointManifest], None] | None = None,
                      on_file: Callable[[FileEntry], None] | None = None) -> tuple[CheckpointManifest, list[Problem]]:
    """Check a checkpoint without loading it; raises ``ManifestError`` if it has no valid manifest.

    ``on_manifest`` is called once the manifest is read, ``on_file`` after each listed file is checked
    (a progress display uses them).
    """
    verify = VerifyMode.parse(mode)
    store = store_for(path, storage_options)
    root = store.normalize(os.fspath(path))
    manifest = read_manifest(store, root, display=os.fspath(path))
    if on_manifest is not None:
        on_manifest(manifest)
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
            finally:
                if on_file is not None:
                    on_file(entry)
            if entry.path.endswith(".safetensors.index.json"):
                problems.extend(_check_index(key, entry.path, entry.rank, store.read_bytes(location), listed))
            files = rule(component.pattern).files
            if isinstance(files, ChunkFiles) and entry.path == files.index_for(key):
                problems.extend(_check_chunk_index(key, entry, store.read_bytes(location), component.files))
    return manifest, problems


def _check_chunk_index(key: str, entry: FileEntry, raw: bytes, files: list[FileEntry]) -> list[Problem]:
    try:
        index = ShardedIndex.from_json(json.loads(raw.decode("utf-8")))
    except (ValueError, CheckpointError) as exc:
        return [Problem(key, entry.path, entry.rank, f"the chunk index cannot be read: {exc}")]
    listed = {f.path: f for f in files}
    wrong = sorted(r.path for r in index.files.values()
                   if r.path not in listed or (listed[r.path].size, listed[r.path].checksum) != (r.size, r.checksum))
    if wrong:
        return [Problem(key, entry.path, entry.rank,
                        f"the chunk index and the manifest disagree on chunk files {wrong[:5]}")]
    return []


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


def human_size(size: int) -> str:
    """``1.5 MiB``-style sizes for tables."""
    value = float(size)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if value < 1024 or unit == "GiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{size} B"


def run_verify(args: argparse.Namespace, console: Console) -> int:
    """The ``verify`` command: print the verdict; 0 if intact, 1 if not."""
    mode = "size" if args.size_only else "checksum"
    with _progress(console, enabled=not args.json) as (on_manifest, on_file):
        manifest, problems = verify_checkpoint(args.path, mode, args.storage_options, on_manifest=on_manifest,
                                               on_file=on_file)
    files = manifest.all_files()
    if args.json:
        print(json.dumps({"path": args.path, "ok": not problems, "checked": mode,
                          "components": len(manifest.components), "files": len(files),
                          "bytes": sum(f.size for f in files), "problems": [asdict(p) for p in problems]}))
        return 1 if problems else 0
    if not problems:
        what = "sizes" if args.size_only else "sizes and checksums"
        console.print(f"OK: {args.path}: {len(manifest.components)} components, {len(files)} files, "
                      f"{human_size(sum(f.size for f in files))}; {what} match the manifest")
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


@contextlib.contextmanager
def byte_progress(console: Console, label: str, enabled: bool = True) -> Iterator[Callable[[int, int], None] | None]:
    """``update(done, total)`` driving a byte-counting progress bar on a terminal; None when piped (no bar)."""
    if not (enabled and console.is_terminal):
        yield None
        return
    with Progress(TextColumn(label), BarColumn(), DownloadColumn(), TransferSpeedColumn(), TimeRemainingColumn(),
                  console=console, transient=True) as progress:
        task = progress.add_task(label, total=None)
        yield lambda done, total: progress.update(task, completed=done, total=total)


@contextlib.contextmanager
def _progress(console: Console, enabled: bool) -> Iterator[tuple[Any, Any]]:
    """``(on_manifest, on_file)`` callbacks for ``verify_checkpoint`` that drive ``byte_progress``, else Nones."""
    with byte_progress(console, "verifying", enabled) as update:
        if update is None:
            yield None, None
            return
        state = {"done": 0, "total": 0}

        def on_manifest(manifest: CheckpointManifest) -> None:
            state["total"] = sum(f.size for f in manifest.all_files())
            update(0, state["total"])

        def on_file(entry: FileEntry) -> None:
            state["done"] += entry.size
            update(state["done"], state["total"])

        yield on_manifest, on_file
