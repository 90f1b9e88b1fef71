"""The simulated jobs of ``scale_sim.py``: Llama-like models as meta-device state, and what a rank's write would report.

A job is a model (layer count, widths) on a layout: ``fsdp_tp`` (FSDP2 over ``dp`` x tensor parallel over ``tp``, the
model and its AdamW state SHARDED as DTensors on a ``("dp", "tp")`` mesh) or ``ddp`` (plain tensors, REPLICATED). Both
add the built-ins a Lightning job saves besides: the RNG state (PER_RANK) and the trainer's counters (GLOBAL).

Nothing holds memory: every tensor is on the ``meta`` device. DTensors are built for one rank at a time under torch's
fake process group (``init_fake``), the way FSDP2 and tensor parallelism place them: a tensor-parallel ``Shard(d)``
(column-wise: q/k/v/gate/up/lm_head/embedding rows, row-wise: o/down columns) and FSDP's ``Shard(0)`` on ``dp`` (a
``_StridedShard(0)`` where tensor parallelism also cut dim 0, as ``fully_shard`` does); norms replicated over ``tp``.

``simulated_write`` stands in for ``CopyFormat.write``, which needs the tensors' bytes: it returns the ``WrittenCopy``
the real write would (the same files, sizes from the real safetensors headers plus the tensor bytes, the same index
records), with placeholder checksums of the real length.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch

from lightning_sharing.checkpoint.manifest import FileEntry
from lightning_sharing.engine.copy_format import CopyPlan, WrittenCopy
from lightning_sharing.format.safetensors_io import dtype_name, encode_header, nbytes
from lightning_sharing.sharded.chunkfile import DEFAULT_BLOCK_SIZE
from lightning_sharing.sharded.index import ChunkRecord, FileRecord, ShardedIndex, TensorRecord
from lightning_sharing.sharded.save import ChunkWrite, WritePlan, chunk_key

__all__ = ["LLAMA_7B", "LLAMA_70B", "Job", "ModelShape", "Stateful", "init_fake", "job_state", "simulated_write"]

CHECKSUM = "xxh3_128:" + "0" * 32  # the length of a real checksum; the value is never checked here
BLOCK_DIGEST = "0" * 32  # an xxh3-128 hex digest per block


@dataclass(frozen=True)
class ModelShape:
    name: str
    layers: int
    hidden: int
    intermediate: int
    kv_hidden: int  # grouped-query attention: k and v project to this width
    vocab: int

    def parameters(self) -> Iterator[tuple[str, tuple[int, ...], str]]:
        """(fully qualified name, shape, tensor-parallel style: col / row / rep) of every parameter, in model order."""
        h, i, kv = self.hidden, self.intermediate, self.kv_hidden
        yield "model.embed_tokens.weight", (self.vocab, h), "col"
        for n in range(self.layers):
            p = f"model.layers.{n}."
            yield p + "self_attn.q_proj.weight", (h, h), "col"
            yield p + "self_attn.k_proj.weight", (kv, h), "col"
            yield p + "self_attn.v_proj.weight", (kv, h), "col"
            yield p + "self_attn.o_proj.weight", (h, h), "row"
            yield p + "mlp.gate_proj.weight", (i, h), "col"
            yield p + "mlp.up_proj.weight", (i, h), "col"
            yield p + "mlp.down_proj.weight", (h, i), "row"
            yield p + "input_layernorm.weight", (h,), "rep"
            yield p + "post_attention_layernorm.weight", (h,), "rep"
        yield "model.norm.weight", (h,), "rep"
        yield "lm_head.weight", (self.vocab, h), "col"

    def numel(self) -> int:
        return sum(math.prod(shape) for _, shape, _ in self.parameters())


LLAMA_70B = ModelShape("llama-70b", layers=80, hidden=8192, intermediate=28672, kv_hidden=1024, vocab=128256)
LLAMA_7B = ModelShape("llama-7b", layers=32, hidden=4096, intermediate=11008, kv_hidden=4096, vocab=32000)


@dataclass(frozen=True)
class Job:
    """A model on a layout at a world size (``tp`` ranks per tensor-parallel group for ``fsdp_tp``)."""

    model: ModelShape
    layout: str  # "fsdp_tp" or "ddp"
    tp: int = 8
    dtype: torch.dtype = torch.float32  # parameters and both AdamW moments (mixed precision keeps fp32 masters)

    @property
    def label(self) -> str:
        return f"{self.model.name} {'FSDP x TP' + str(self.tp) if self.layout == 'fsdp_tp' else 'DDP'}"


class Stateful:
    """A stateful that returns a prepared state (``state_dict()`` is free, so planning is what is timed)."""

    def __init__(self, state: Any) -> None:
        self.state = state

    def state_dict(self) -> Any:
        return self.state

    def load_state_dict(self, state: Any) -> None:
        self.state = state


def init_fake(rank: int, world_size: int) -> None:
    """(Re)initialise torch's fake process group as ``rank`` of ``world_size``: meshes and DTensors as that rank sees
    them, in this one process (its collectives do nothing)."""
    import torch.distributed as dist
    from torch.testing._internal.distributed.fake_pg import FakeStore

    if dist.is_initialized():
        dist.destroy_process_group()
    dist.init_process_group("fake", store=FakeStore(), rank=rank, world_size=world_size)


def close_fake() -> None:
    """Destroy the fake process group, if one is up."""
    import torch.distributed as dist

    if dist.is_initialized():
        dist.destroy_process_group()


def _dtensor_factory(world_size: int, tp: int) -> Any:
    """A function (global shape, TP style, dtype) -> this rank's meta DTensor on a ``(dp, tp)`` mesh."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor, Replicate, Shard
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset
    from torch.distributed.tensor.placement_types import _StridedShard

    # Dim names of this rank's own: DTensor caches sharding propagation (``detach()``, ...) by mesh equality, which
    # ignores the rank, so the output of an op cached for an earlier simulated rank would carry that rank's mesh and
    # pieces (one rank per process never meets this). The package does not read dim names.
    rank = torch.distributed.get_rank()
    mesh = init_device_mesh("cpu", (world_size // tp, tp), mesh_dim_names=(f"dp{rank}", f"tp{rank}"))
    styles = {"col": (_StridedShard(0, split_factor=tp), Shard(0)), "row": (Shard(0), Shard(1)),
              "rep": (Shard(0), Replicate())}

    def make(shape: tuple[int, ...], style: str, dtype: torch.dtype) -> torch.Tensor:
        placements = styles[style]
        local, _ = compute_local_shape_and_global_offset(shape, mesh, placements)
        stride = tuple(math.prod(shape[d + 1:]) for d in range(len(shape)))
        return DTensor.from_local(torch.empty(local, device="meta", dtype=dtype), mesh, placements, run_check=False,
                                  shape=torch.Size(shape), stride=stride)

    return make


def job_state(job: Job, rank: int, world_size: int) -> dict[str, Any]:
    """Component key -> (pattern name, state) of ``rank``; for ``fsdp_tp`` the fake group must be ``rank``'s."""
    from lightning_sharing.statefuls.rng import RNGState

    if job.layout == "fsdp_tp":
        make = _dtensor_factory(world_size, job.tp)
        tensor = lambda shape, style: make(shape, style, job.dtype)  # noqa: E731
        pattern = "sharded"
    else:
        tensor = lambda shape, style: torch.empty(shape, device="meta", dtype=job.dtype)  # noqa: E731
        pattern = "replicated"
    model = {name: tensor(shape, style) for name, shape, style in job.model.parameters()}
    # OptimizerState's layout: AdamW state keyed by parameter name; ``step`` a plain 0-d tensor, as torch keeps it.
    optimizer = {
        "state": {name: {"step": torch.tensor(100.0), "exp_avg": tensor(shape, style),
                         "exp_avg_sq": tensor(shape, style)} for name, shape, style in job.model.parameters()},
        "param_groups": [{"lr": 3e-4, "betas": [0.9, 0.95], "eps": 1e-8, "weight_decay": 0.1, "amsgrad": False,
                          "maximize": False, "foreach": None, "capturable": False, "differentiable": False,
                          "fused": None, "params": [name for name, _, _ in job.model.parameters()]}],
    }
    trainer = {"epoch": 3, "global_step": 100_000, "loops": {"fit_loop": {"batches_that_stepped": 100_000}}}
    return {"model": (pattern, model), "optimizer": (pattern, optimizer), "rng": ("per_rank", RNGState().state_dict()),
            "trainer": ("global", trainer)}


_GROUPED: dict[int, tuple[WritePlan, dict[int, list[ChunkWrite]]]] = {}


def _by_writer(writes: WritePlan) -> dict[int, list[ChunkWrite]]:
    """Every rank's chunks of a plan, grouped once (not once per rank: that is O(ranks x chunks))."""
    if id(writes) not in _GROUPED:
        if len(_GROUPED) > 4:
            _GROUPED.clear()
        grouped: dict[int, list[ChunkWrite]] = {}
        for write in writes.writes:
            grouped.setdefault(write.writer, []).append(write)
        _GROUPED[id(writes)] = (writes, grouped)  # the plan kept alive: its id stays its own
    return _GROUPED[id(writes)][1]


def _chunk_part(writes: WritePlan, file: str, rank: int) -> tuple[ShardedIndex, int]:
    """What ``sharded.save.write_chunks`` returns for ``rank`` (its index part), and its chunk file's size."""
    mine = _by_writer(writes).get(rank, [])
    records: dict[str, list[ChunkRecord]] = {name: [] for name in writes.layouts}
    files: dict[str, FileRecord] = {}
    if mine:
        keys = {id(w): chunk_key(w.name, w.box, writes.layouts[w.name].global_shape) for w in mine}
        metas = {keys[id(w)]: torch.empty(w.box.sizes, device="meta", dtype=writes.layouts[w.name].dtype)
                 for w in mine}
        order = sorted(metas, key=lambda key: (-metas[key].element_size(), key))
        position = len(encode_header(metas, order, {"format": "pt", "lightning_sharing": "sharded-chunks"}))
        begins = {}
        for key in order:
            begins[key] = position
            position += nbytes(metas[key])
        files[file] = FileRecord(file, position, CHECKSUM, DEFAULT_BLOCK_SIZE, rank)
        for w in mine:
            length = w.nbytes
            blocks = (BLOCK_DIGEST,) * math.ceil(length / DEFAULT_BLOCK_SIZE)
            records[w.name].append(ChunkRecord(w.box.offsets, w.box.sizes, file, keys[id(w)], begins[keys[id(w)]],
                                               length, rank, blocks))
    tensors = {name: TensorRecord(dtype_name(layout.dtype), layout.global_shape, tuple(records[name]))
               for name, layout in writes.layouts.items()}
    return ShardedIndex(tensors, files), sum(f.size for f in files.values())


def simulated_write(plan: CopyPlan, rank: int, chunked: bool, own: bool = True) -> WrittenCopy:
    """The ``WrittenCopy`` rank ``rank`` would report for ``plan``: its own plan, or (``own=False``, chunks only)
    another rank's (``plan_writes`` is the same on every rank; the planning rank's JSON files are left out). Sizes
    exact, checksums placeholders of the real length."""
    entries: list[FileEntry] = []
    part: dict[str, Any] | None = None
    for job in plan.jobs:
        if job.data is not None:
            if own:
                entries.append(FileEntry(job.rel, len(job.data), CHECKSUM, rank))
            continue
        if chunked:
            file = job.rel.rsplit("/", 1)[0] + f"/chunks-{rank:05d}.safetensors"
            index, size = _chunk_part(plan.detail.writes, file, rank)
            part = dataclasses.replace(index, ties=plan.detail.ties).to_json()
            if size:
                entries.append(FileEntry(file, size, CHECKSUM, rank))
            continue
        tensors = job.tensors or {}
        order = sorted(tensors, key=lambda name: (-tensors[name].element_size(), name))
        size = len(encode_header(tensors, order, {"format": "pt"})) + sum(nbytes(t) for t in tensors.values())
        entries.append(FileEntry(job.rel, size, CHECKSUM, rank))
    # A chunk copy's detail is a list of index parts, one per chunk file (ChunkFormat.write).
    return WrittenCopy(plan.key, plan.stem, rank, entries, ([part] if part is not None else []) if chunked
                       else plan.detail)
