"""``lightning-sharing inspect PATH [--files] [--json]``: what a checkpoint holds, the bytes its save wrote and reused
(an incremental save's linked or copied files), and for SHARDED components the chunks each rank wrote (``--json``:
the manifest, the chunk counts and the bytes as one JSON document).

Example:
    >>> from lightning_sharing.cli import main
    >>> main(["inspect", "runs/step=500.ckpt"])   # doctest: +SKIP
"""

from __future__ import annotations

import argparse
import json
import os
from typing import Any

from rich.console import Console
from rich.table import Table

from lightning_sharing.checkpoint.manifest import CheckpointManifest, data_root
from lightning_sharing.cli.verify import human_size
from lightning_sharing.core.rules import ChunkFiles, rule
from lightning_sharing.errors import CheckpointError
from lightning_sharing.sharded.index import ShardedIndex
from lightning_sharing.storage import store_for

__all__ = ["chunks_by_rank", "reuse_summary", "run_inspect"]


def chunks_by_rank(index: ShardedIndex) -> dict[int, tuple[int, int, int]]:
    """Per writing rank: (tensors it wrote a chunk of, chunks, chunk bytes)."""
    rows: dict[int, tuple[set[str], int, int]] = {}
    for name, record in index.tensors.items():
        for chunk in record.chunks:
            names, count, size = rows.setdefault(chunk.writer, (set(), 0, 0))
            names.add(name)
            rows[chunk.writer] = (names, count + 1, size + chunk.length)
    return {rank: (len(names), count, size) for rank, (names, count, size) in sorted(rows.items())}


def _chunk_indexes(path: str, manifest: CheckpointManifest, storage_options: Any) -> dict[str, ShardedIndex | str]:
    """Each SHARDED component's chunk index, or why it cannot be read."""
    store = store_for(path, storage_options)
    root = data_root(store, store.normalize(os.fspath(path)), manifest)
    found: dict[str, ShardedIndex | str] = {}
    for key, component in manifest.components.items():
        chunks = rule(component.pattern).files
        if not isinstance(chunks, ChunkFiles) or chunks.index_for(key) not in {f.path for f in component.files}:
            continue
        try:
            raw = store.read_bytes(store.join(root, chunks.index_for(key)))
            found[key] = ShardedIndex.from_json(json.loads(raw.decode("utf-8")))
        except (OSError, ValueError, CheckpointError) as exc:
            found[key] = f"the chunk index cannot be read ({exc}); run lightning-sharing verify"
    return found


def _chunk_tables(indexes: dict[str, ShardedIndex | str], console: Console) -> None:
    for key, index in indexes.items():
        if isinstance(index, str):
            console.print(f"{key}: {index}", markup=False)
            continue
        total = sum(len(t.chunks) for t in index.tensors.values())
        table = Table(title=f"{key}: {len(index.tensors)} tensors in {total} chunks", show_lines=False)
        for column in ("rank", "tensors", "chunks", "bytes", "file"):
            table.add_column(column)
        files = {f.writer: f.path for f in index.files.values()}
        for rank, (tensors, count, size) in chunks_by_rank(index).items():
            table.add_row(str(rank), str(tensors), str(count), human_size(size), files.get(rank, "-"))
        console.print(table)


def _as_json(path: str, manifest: CheckpointManifest, indexes: dict[str, ShardedIndex | str]) -> str:
    chunks: dict[str, Any] = {}
    for key, index in indexes.items():
        if isinstance(index, str):
            chunks[key] = {"error": index}
            continue
        files = {f.writer: f.path for f in index.files.values()}
        chunks[key] = {str(rank): {"tensors": tensors, "chunks": count, "bytes": size, "file": files.get(rank)}
                       for rank, (tensors, count, size) in chunks_by_rank(index).items()}
    return json.dumps({"path": path, "manifest": manifest.to_json(), "chunks_by_rank": chunks,
                       "bytes": reuse_summary(manifest)})


def reuse_summary(manifest: CheckpointManifest) -> dict[str, Any]:
    """Bytes the save wrote and bytes it reused (linked or copied from earlier checkpoints, by name).

    Example:
        >>> reuse_summary(CheckpointManifest.load("runs/step=2.ckpt"))     # doctest: +SKIP
        {'written': 1224, 'reused': 67224, 'from': {'step=1.ckpt': 67224}}
    """
    sources: dict[str, int] = {}
    for entry in manifest.all_files():
        if entry.reused and entry.origin is not None:
            name = entry.origin.get("from", "?")
            sources[name] = sources.get(name, 0) + entry.size
    reused = sum(sources.values())
    return {"written": sum(f.size for f in manifest.all_files()) - reused, "reused": reused, "from": sources}


def _reuse_line(manifest: CheckpointManifest) -> str:
    summary = reuse_summary(manifest)
    line = f"bytes written {human_size(summary['written'])}, reused {human_size(summary['reused'])}"
    if summary["from"]:
        line += " (linked or copied from " + ", ".join(sorted(summary["from"])) + ")"
    return line


def run_inspect(args: argparse.Namespace, console: Console) -> int:
    """The ``inspect`` command: the manifest as a table, chunks per rank, and (``--files``) every file."""
    manifest = CheckpointManifest.load(args.path, args.storage_options)
    indexes = _chunk_indexes(args.path, manifest, args.storage_options)
    if args.json:
        print(_as_json(args.path, manifest, indexes))
        return 0
    topology = manifest.topology
    console.print(f"{args.path}: step {manifest.step}, world size {manifest.world_size}, "
                  f"nodes {topology.get('nodes')}, groups {topology.get('groups') or '{}'}, "
                  f"saved {manifest.created_at} (format {manifest.format_version}, "
                  f"lightning_sharing {manifest.library_version or '?'}, torch {manifest.torch_version or '?'})")
    table = Table(show_lines=False)
    for column in ("component", "pattern", "group", "writer ranks", "files", "size", "reused", "validation"):
        table.add_column(column)
    for key, component in manifest.components.items():
        table.add_row(key, component.sharing_pattern.upper(), component.group_name or "-",
                      ",".join(str(r) for r in component.ranks), str(len(component.files)),
                      human_size(component.size_bytes), human_size(sum(f.size for f in component.files if f.reused)),
                      component.validation)
    console.print(table)
    console.print(_reuse_line(manifest), markup=False)
    for key, component in manifest.components.items():
        if component.hf_model is not None:
            record = component.hf_model
            console.print(f"{key}: transformers {record.class_name} under prefix {record.prefix!r} (lightning-sharing "
                          "export writes its config.json)", markup=False)
    if manifest.data_prefix:
        console.print(f"files under {manifest.data_prefix}/ (this save's generation on an object store)")
    _chunk_tables(indexes, console)
    if args.files:
        files = Table(title="files")
        for column in ("path", "rank", "size", "checksum", "origin"):
            files.add_column(column)
        for entry in manifest.all_files():
            origin = entry.origin or {}
            files.add_row(entry.path, str(entry.rank), str(entry.size), entry.checksum,
                          " from ".join(origin[k] for k in ("kind", "from") if k in origin) or "-")
        console.print(files)
    return 0
