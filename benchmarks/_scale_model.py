"""The object-store model of ``scale_sim.py``: requests per save and per load, bytes read per load.

Derived from ``storage/object_files.py`` and ``storage/object_store.py`` (a model: no store is called):

- **save**: a file under ``PART_SIZE`` (16 MiB) is one PUT; a larger one a multipart upload (create, one PUT per
  part, complete). Rank 0's ``begin_save`` is a HEAD of the target and two listings (the generations scan and the
  directory's cleanup); the commit lists the write root once to see every file (``check_visible`` -> ``sizes``:
  one LIST per 1,000 objects), PUTs the merged indexes, PUTs the manifest (conditional), and lists once more
  (``clean_after_commit``). A new directory: no earlier manifest to GET, nothing to delete.
- **load**, every rank: a HEAD of the checkpoint and a GET of the manifest (``read_manifest``), a listing of the
  data root (``check_listed_files``: one LIST per 1,000 objects), then what it reads: a whole-tensor copy's files
  whole (``placement_for_reader``: the copy it reads), a chunked component's index and structure whole and the chunks
  that overlap what it holds (at the saved layout: exactly its own boxes); each read a ranged GET per started 8 MiB
  (``_READ_CHUNK``; the adaptive readahead's first 1 MiB GET on small files is counted as one GET).
- **read-once** (``CheckpointOptions(read_once=...)``): the manifest, its HEAD and the listing once per load (rank 0,
  ``engine/load.py``); every whole-tensor file, and every chunk held by several ranks, read from storage once per
  load (``engine/read_once.py``, ``engine/shared_pieces.py``); rank-specific files, chunks held by one rank and a
  chunked component's index and structure (every rank still reads them itself) as before.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

from lightning_sharing.core.rules import placements
from lightning_sharing.core.topology import Topology
from lightning_sharing.storage.object_files import _READ_CHUNK, PART_SIZE

__all__ = ["load_traffic", "save_requests"]

LIST_PAGE = 1000  # objects per LIST response (S3's maximum)


def _puts(size: int) -> int:
    return 1 if size < PART_SIZE else 2 + math.ceil(size / PART_SIZE)


def _gets(size: int) -> int:
    return max(1, math.ceil(size / _READ_CHUNK))


def save_requests(sizes_by_file: Mapping[str, int], manifest_bytes: int) -> dict[str, int]:
    """Object-store requests of one save (every rank together), by the rules in the module docstring."""
    listing = math.ceil((len(sizes_by_file) + 1) / LIST_PAGE)
    data = sum(_puts(size) for size in sizes_by_file.values())
    return {"save_requests": 3 + data + listing + _puts(manifest_bytes) + 1}


def load_traffic(components: list[Any], topology: Topology, files_by_stem: Mapping[str, Mapping[str, int]],
                 chunk_writes: Mapping[str, Any], sizes_by_file: Mapping[str, int], manifest_bytes: int,
                 chunk_meta: Mapping[str, list[str]]) -> dict[str, int]:
    """Requests and bytes of one load at the saved layout (every rank together), and one rank's metadata bytes.

    ``files_by_stem``: the files of each whole-tensor copy; ``chunk_writes``: each chunked component's ``WritePlan``
    (every chunk, its bytes and holders); ``chunk_meta``: each chunked component's index and structure files.
    """
    world = topology.world_size
    listing = math.ceil((len(sizes_by_file) + 1) / LIST_PAGE)
    per_rank = 2 + listing  # HEAD + GET of the manifest, the listing
    requests, requests_once = world * per_rank, per_rank
    read, read_once = world * manifest_bytes, manifest_bytes
    meta_rank = manifest_bytes
    for component in components:
        key = component.key
        if key in chunk_writes:
            meta = [sizes_by_file[rel] for rel in chunk_meta[key]]
            requests += world * sum(_gets(s) for s in meta)
            requests_once += world * sum(_gets(s) for s in meta)
            read += world * sum(meta)
            read_once += world * sum(meta)
            meta_rank += sum(meta)
            for write in chunk_writes[key].writes:
                holders = len(write.holders)
                requests += holders * _gets(write.nbytes)
                requests_once += _gets(write.nbytes)
                read += holders * write.nbytes
                read_once += write.nbytes
            continue
        copies = placements(key, component.sharing_pattern, topology)
        for placement in copies:
            sizes = list(files_by_stem.get(placement.stem, {}).values())
            readers = len(placement.readers)  # the copies partition the ranks: each reads the one it is in
            requests += readers * sum(_gets(s) for s in sizes)
            requests_once += sum(_gets(s) for s in sizes) * (1 if readers else 0)
            read += readers * sum(sizes)
            read_once += sum(sizes) * (1 if readers else 0)
    return {"load_requests": requests, "load_requests_once": requests_once, "load_read_bytes": read,
            "load_read_bytes_once": read_once, "load_meta_bytes_rank": meta_rank}
