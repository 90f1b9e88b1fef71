"""SHARDED state through CheckpointCoordinator on real gloo process groups: saves, resharded loads, bit-exact.

One checkpoint chain, each step one launched job (the module fixture runs them once):
  A (2 ranks, FSDP2): train 3 AdamW steps, save model + optimizer ("a", validated; again asynchronously);
    a DTensor declared REPLICATED is refused; a rank failing inside its chunk write leaves "a" as it was;
    train a 4th step; load "a" into fresh FSDP2 modules; a wrong global shape and one corrupt chunk are
    refused on every rank.
  B (4 ranks): load "a" into FSDP2 over 4 ranks and into FSDP 2 x TP 2, save both ("b4", "b2x2"); a state
    split over two groups (pipeline stages of plain tensors) saved and loaded back; HSDP chunk writers
    and a Partial placement with the phase-1 functions.
  C (2 ranks): new processes resume from "a" under FSDP2 and take the 4th step: equal to A's; load "b4"
    and "b2x2" into FSDP2 over 2 ranks and "b2x2" into DDP; save from DDP with an HF export written by both
    ranks; save DDP's state REPLICATED (the optimizer by name and numbered) and load it into FSDP2, declared
    either way; "b2x2" into DDP declared REPLICATED.
Then, in this process (no process group): "a" and "b2x2" into a plain module and optimizer, the stages
into one unsplit state, the command-line export equal to the full tensors, inspect's chunks per rank.
Every load is compared with torch.equal on full_tensor() against the state saved in A.
"""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file
from support.dist_harness import run_distributed
from support.sharded import (
    BLOCK,
    components,
    differences,
    fsdp_model,
    fsdp_tp_model,
    full_state,
    load_index,
    make_model,
    raw_read,
    save_state,
    train,
)
from support.statefuls import Holder

from lightning_sharing import CheckpointCoordinator, CheckpointManifest, SharingPattern, StateComponent
from lightning_sharing.cli import main

CORRUPT_TENSOR = "0.weight"


def _optimizer(model: torch.nn.Module, lr: float = 0.01) -> torch.optim.Optimizer:
    return torch.optim.AdamW(model.parameters(), lr=lr)


def _error(fn) -> str:
    from lightning_sharing import CheckpointError

    try:
        fn()
    except CheckpointError as exc:
        return f"{type(exc).__name__}: {exc}"
    return "ok"


def _job_a(rank: int, world: int, root) -> dict:
    import os

    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    from lightning_sharing._faults import FAULTS_ENV

    ckpt, out = root / "ckpt", {}
    model = fsdp_model(world)
    optimizer = _optimizer(model)
    train(model, optimizer, 3)
    coordinator = CheckpointCoordinator(components(model, optimizer, validate_replication=True,
                                                   validation_level="tensor"))
    coordinator.save_checkpoint(ckpt / "a.ckpt", step=3)
    reference = full_state(model, optimizer)
    out["held"] = sorted(k for k, v in model.state_dict().items() if v.to_local().numel())
    background = CheckpointCoordinator(components(model, optimizer), async_save=True)
    background.save_checkpoint(ckpt / "async.ckpt", step=3)
    background.wait()
    out["replicated"] = _error(lambda: CheckpointCoordinator(
        [StateComponent("model", model, SharingPattern.REPLICATED)]).save_checkpoint(ckpt / "never.ckpt"))

    train(model, optimizer, 1)  # a replaced "a" would now hold other values
    os.environ[FAULTS_ENV] = "save:write@1:raise"
    try:
        out["fault"] = _error(lambda: coordinator.save_checkpoint(ckpt / "a.ckpt", step=4))
    finally:
        del os.environ[FAULTS_ENV]
    dist.barrier()
    out["listing"] = sorted(p.name for p in ckpt.iterdir())
    after = full_state(model, optimizer)

    fresh = fsdp_model(world, seed=7)
    fresh_optimizer = _optimizer(fresh, lr=0.5)
    CheckpointCoordinator(components(fresh, fresh_optimizer)).load_checkpoint(ckpt / "a.ckpt")
    out["loaded"] = differences(full_state(fresh, fresh_optimizer), reference)
    out["read"] = raw_read(ckpt / "a.ckpt", "model", fresh.state_dict())

    wrong = torch.nn.Sequential(torch.nn.Linear(5, 8), torch.nn.ReLU(), torch.nn.Linear(8, 3), torch.nn.ReLU(),
                                torch.nn.Linear(3, 1))
    fully_shard(wrong, mesh=init_device_mesh("cpu", (world,), mesh_dim_names=("dp",)))
    out["shape"] = _error(lambda: CheckpointCoordinator([StateComponent("model", wrong, SharingPattern.SHARDED)])
                          .load_checkpoint(ckpt / "a.ckpt", strict=False))

    # One flipped byte inside rank 1's chunk of CORRUPT_TENSOR, in a copy of the checkpoint.
    if rank == 0:
        shutil.copytree(ckpt / "a.ckpt", root / "bad.ckpt")
        chunk = next(c for c in load_index(root / "bad.ckpt", "model").tensors[CORRUPT_TENSOR].chunks if c.writer == 1)
        with open(root / "bad.ckpt" / chunk.file, "r+b") as handle:
            handle.seek(chunk.begin + 5)
            byte = handle.read(1)
            handle.seek(chunk.begin + 5)
            handle.write(bytes([byte[0] ^ 0x01]))
    dist.barrier()
    for name, target in (("plain", make_model(seed=7)), ("sharded", fsdp_model(world, seed=7))):
        out[f"corrupt_{name}"] = _error(lambda t=target: CheckpointCoordinator(
            [StateComponent("model", t, SharingPattern.SHARDED)]).load_checkpoint(root / "bad.ckpt", strict=False))
    out["reference"] = reference if rank == 0 else None
    out["after"] = after if rank == 0 else None
    return out


def _job_b(rank: int, world: int, root, reference: dict) -> dict:
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor, Partial, Replicate, Shard, distribute_tensor

    from lightning_sharing.errors import UnsupportedStateError
    from lightning_sharing.sharded import plan_writes

    ckpt, out = root / "ckpt", {}
    model = fsdp_model(world)
    optimizer = _optimizer(model, lr=0.5)
    CheckpointCoordinator(components(model, optimizer)).load_checkpoint(ckpt / "a.ckpt")
    out["fsdp4"] = differences(full_state(model, optimizer), reference)
    out["fsdp4_read"] = raw_read(ckpt / "a.ckpt", "model", model.state_dict())
    CheckpointCoordinator(components(model, optimizer)).save_checkpoint(ckpt / "b4.ckpt")

    model = fsdp_tp_model()
    optimizer = _optimizer(model, lr=0.5)
    coordinator = CheckpointCoordinator(components(model, optimizer, validate_replication=True,
                                                   validation_level="tensor"))
    coordinator.load_checkpoint(ckpt / "a.ckpt")
    out["tp"] = differences(full_state(model, optimizer), reference)
    out["tp_placements"] = {k: str(v.placements) for k, v in model.state_dict().items()}
    coordinator.save_checkpoint(ckpt / "b2x2.ckpt")

    # Two pipeline stages of plain tensors, each held by a data-parallel pair: ranks {0, 2} hold
    # stage 0, ranks {1, 3} stage 1; "replicas" names the pair, whose members hold the same tensors.
    pairs = [dist.new_group([0, 2]), dist.new_group([1, 3])]
    stage = rank % 2
    torch.manual_seed(10 + stage)
    saved = {f"layers.{stage}.weight": torch.randn(4, 3), f"layers.{stage}.scale": 0.5 + stage}
    groups = {"replicas": pairs[stage]}
    CheckpointCoordinator([StateComponent("stages", Holder(dict(saved)), SharingPattern.SHARDED,
                                          process_group_name="replicas", validate_replication=True,
                                          validation_level="tensor")], process_groups=groups
                          ).save_checkpoint(ckpt / "stages.ckpt")
    out["stage_saved"] = saved
    fresh = Holder({f"layers.{stage}.weight": torch.zeros(4, 3), f"layers.{stage}.scale": 0.0})
    CheckpointCoordinator([StateComponent("stages", fresh, SharingPattern.SHARDED, process_group_name="replicas")],
                          process_groups=groups).load_checkpoint(ckpt / "stages.ckpt")
    out["stage_same_groups"] = differences(fresh.state, saved)
    # Declared without the group (one copy over all ranks): each rank still takes its own stage's entries.
    fresh = Holder({f"layers.{stage}.weight": torch.zeros(4, 3), f"layers.{stage}.scale": 0.0})
    CheckpointCoordinator([StateComponent("stages", fresh, SharingPattern.SHARDED)]).load_checkpoint(
        ckpt / "stages.ckpt")
    out["stage_no_groups"] = differences(fresh.state, saved)
    # Every rank holding stage 0 only: stage 1's entries are held by no rank.
    only = Holder({"layers.0.weight": torch.zeros(4, 3), "layers.0.scale": 0.0})
    out["stage_unheld"] = _error(lambda: CheckpointCoordinator([StateComponent("stages", only, SharingPattern.SHARDED)])
                                 .load_checkpoint(ckpt / "stages.ckpt"))

    # HSDP-style: mesh [[0, 1], [2, 3]] as ("replicate", "shard"), saved with the phase-1 functions.
    mesh = init_device_mesh("cpu", (2, 2), mesh_dim_names=("replicate", "shard"))
    torch.manual_seed(3)
    hsdp = {f"w{i}": distribute_tensor(torch.randn(8, 4), mesh, [Replicate(), Shard(0)]) for i in range(4)}
    hsdp["v"] = distribute_tensor(torch.randn(6), mesh, [Shard(0), Replicate()])
    hsdp["s"] = distribute_tensor(torch.randn(3, 3), mesh, [Replicate(), Replicate()])
    hsdp["p"] = torch.arange(5.0)  # a plain tensor: held by every rank
    out["hsdp_saved"] = save_state(ckpt, "hsdp", hsdp)
    hsdp_full = {k: v.full_tensor() if isinstance(v, DTensor) else v for k, v in hsdp.items()}  # collective
    out["hsdp_full"] = hsdp_full if rank == 0 else None
    try:
        plan_writes({"pending": DTensor.from_local(torch.ones(2), mesh, [Partial(), Replicate()])})
        out["partial"] = "accepted"
    except UnsupportedStateError as exc:
        out["partial"] = str(exc)
    return out


def _job_c(rank: int, world: int, root, reference: dict, after: dict) -> dict:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.nn.parallel import DistributedDataParallel

    from lightning_sharing import HFExport, OptimizerState
    from lightning_sharing.engine.export import export_in_parallel
    from lightning_sharing.statefuls.modules import ShardedModuleState
    from lightning_sharing.storage import store_for

    ckpt, out = root / "ckpt", {}
    # A's processes are gone: resume from "a" in these new ones and take the step A took after saving it.
    model = fsdp_model(world, seed=11)
    optimizer = _optimizer(model, lr=0.5)
    CheckpointCoordinator(components(model, optimizer)).load_checkpoint(ckpt / "a.ckpt")
    train(model, optimizer, 1)
    out["resumed_step"] = differences(full_state(model, optimizer), after)
    for key in ("b4", "b2x2"):
        model = fsdp_model(world)
        optimizer = _optimizer(model, lr=0.5)
        CheckpointCoordinator(components(model, optimizer)).load_checkpoint(ckpt / f"{key}.ckpt")
        out[key] = differences(full_state(model, optimizer), reference)
        out[f"{key}_read"] = raw_read(ckpt / f"{key}.ckpt", "model", model.state_dict())
    ddp = DistributedDataParallel(make_model(seed=7))
    optimizer = _optimizer(ddp, lr=0.5)
    coordinator = CheckpointCoordinator(components(ddp.module, optimizer))
    coordinator.load_checkpoint(ckpt / "b2x2.ckpt")
    out["ddp"] = differences(full_state(ddp.module, optimizer), reference)
    out["ddp_read"] = raw_read(ckpt / "b2x2.ckpt", "model", ddp.module.state_dict())
    # DDP replicas saved as SHARDED: each plain tensor written once, the writing spread; an HF export at save time.
    coordinator.save_checkpoint(ckpt / "ddp.ckpt", export_hf=HFExport(root / "hf-ddp", max_shard_size=100))
    out["exported_here"] = export_in_parallel(store_for(ckpt), str(ckpt / "b2x2.ckpt"),
                                              HFExport(root / "hf-b2x2", max_shard_size=100))
    # A DDP run's REPLICATED checkpoint (whole tensors; the optimizer by name and in torch's numbered form) loads
    # into FSDP2: a raw module, ShardedModuleState, and both optimizer forms through OptimizerState.
    replicated = SharingPattern.REPLICATED
    CheckpointCoordinator([StateComponent("model", ddp.module, replicated),
                           StateComponent("optim", OptimizerState(ddp.module, optimizer), replicated),
                           StateComponent("numbered", optimizer, replicated)]).save_checkpoint(ckpt / "repl.ckpt")
    variants = {"repl_raw": (lambda m: m, "optim", "numbered"),
                "repl_numbered": (ShardedModuleState, "numbered", "optim")}
    for name, (wrap, optim_key, ignored) in variants.items():
        model = fsdp_model(world)
        optimizer = _optimizer(model, lr=0.5)
        coordinator = CheckpointCoordinator([StateComponent("model", wrap(model), replicated),
                                             StateComponent(optim_key, OptimizerState(model, optimizer), replicated)])
        coordinator.load_checkpoint(ckpt / "repl.ckpt", ignore=[ignored])
        out[name] = differences(full_state(model, optimizer), reference)
    # Declared SHARDED (as Fabric declares an FSDP2 module), the REPLICATED copies are read as they were saved;
    # declared REPLICATED (a DDP module), a SHARDED checkpoint is.
    model = fsdp_model(world)
    optimizer = _optimizer(model, lr=0.5)
    CheckpointCoordinator(components(model, optimizer)).load_checkpoint(ckpt / "repl.ckpt", ignore=["numbered"])
    out["repl_as_sharded"] = differences(full_state(model, optimizer), reference)
    plain = DistributedDataParallel(make_model(seed=3))
    optimizer = _optimizer(plain, lr=0.5)
    CheckpointCoordinator([StateComponent("model", plain.module, replicated),
                           StateComponent("optim", OptimizerState(plain.module, optimizer), replicated)]
                          ).load_checkpoint(ckpt / "b2x2.ckpt")
    out["sharded_as_repl"] = differences(full_state(plain.module, optimizer), reference)
    other = torch.nn.Sequential(torch.nn.Linear(5, 8))  # "0.bias" is [8] here, [7] in the checkpoint
    fully_shard(other, mesh=init_device_mesh("cpu", (world,)))
    out["repl_other_shape"] = _error(lambda: CheckpointCoordinator([StateComponent("model", other, replicated)])
                                     .load_checkpoint(ckpt / "repl.ckpt", strict=False))
    return out


@pytest.fixture(scope="module")
def chain(tmp_path_factory):
    root = tmp_path_factory.mktemp("sharded")
    a = run_distributed(_job_a, 2, root)
    reference = a[0]["reference"]
    b = run_distributed(_job_b, 4, root, reference)
    c = run_distributed(_job_c, 2, root, reference, a[0]["after"])
    return {"root": root, "ckpt": root / "ckpt", "a": a, "b": b, "c": c, "reference": reference}


def _model_reference(reference: dict) -> dict[str, torch.Tensor]:
    return {k.removeprefix("model."): v for k, v in reference.items() if k.startswith("model.")}


def _written_keys(checkpoint, key: str) -> dict[int, list[str]]:
    """The safetensors keys in each rank's chunk file, read with plain safetensors."""
    keys = {}
    for path in sorted((checkpoint / key).glob("chunks-*.safetensors")):
        with safe_open(str(path), "pt") as handle:
            keys[int(path.stem.split("-")[1])] = sorted(handle.keys())
    return keys


def _expected_keys(index) -> dict[int, list[str]]:
    keys: dict[int, list[str]] = {}
    for record in index.tensors.values():
        for chunk in record.chunks:
            keys.setdefault(chunk.writer, []).append(chunk.key)
    return {rank: sorted(names) for rank, names in sorted(keys.items())}


def test_fsdp2_same_mesh_round_trip_and_resume_in_new_processes(chain):
    a, checkpoint = chain["a"], chain["ckpt"] / "a.ckpt"
    index = load_index(checkpoint, "model")
    for result in chain["c"]:  # new processes: the resumed 4th step is bit-identical to the uninterrupted one
        assert result["resumed_step"] == []
    for result in a:
        assert result["loaded"] == []
        # Same mesh: every piece is a whole chunk, read as whole blocks: nothing beyond what is needed.
        assert result["read"]["read"] == result["read"]["needed"]
        # 1-D FSDP: no replicas, so each rank writes exactly the pieces it holds.
    for rank in (0, 1):
        assert sorted({n for n, t in index.tensors.items() for c in t.chunks if c.writer == rank}) == a[rank]["held"]
    # Rank 1 holds no row of the 1-row layer: an empty shard, nothing written for it there.
    assert "4.weight" not in a[1]["held"] and [c.writer for c in index.tensors["4.weight"].chunks] == [0]
    # The plain AdamW step tensors (held by both ranks) are written once each, by one of them.
    optim = load_index(checkpoint, "optim")
    steps = [name for name in optim.tensors if name.endswith(".step")]
    assert len(steps) == 6 and all(len(optim.tensors[n].chunks) == 1 for n in steps)
    # Rank 1 holds fewer DTensor bytes, so the balancing gives it every step tensor.
    assert {optim.tensors[n].chunks[0].writer for n in steps} == {1}
    for key, saved in (("model", index), ("optim", optim)):
        assert _written_keys(checkpoint, key) == _expected_keys(saved)


def test_exact_files_each_rank_wrote(chain):
    checkpoint = chain["ckpt"] / "a.ckpt"
    manifest = CheckpointManifest.load(checkpoint)
    assert {(f.path, f.rank) for f in manifest.all_files()} == {
        ("model/chunks-00000.safetensors", 0), ("model/chunks-00001.safetensors", 1), ("model/index.json", 0),
        ("optim/chunks-00000.safetensors", 0), ("optim/chunks-00001.safetensors", 1), ("optim/index.json", 0),
        ("optim.json", 0),
    }
    assert sorted(p.relative_to(checkpoint).as_posix() for p in checkpoint.rglob("*") if p.is_file()) == sorted(
        [f.path for f in manifest.all_files()] + ["checkpoint_manifest.json"])
    model = manifest.components["model"]
    assert (model.sharing_pattern, model.ranks, model.storage, model.validation) == ("sharded", [0, 1], "tensors",
                                                                                     "tensor")
    assert manifest.components["optim"].storage == "tree"
    # Chunk bytes per rank, as planned: every chunk once in the job.
    # Rows 0-3 of 7, 0-1 of 3 and the 1-row layer on rank 0; the rest on rank 1.
    assert load_index(checkpoint, "model").bytes_by_writer() == {0: 176, 1: 104}
    assert sum(load_index(checkpoint, "model").bytes_by_writer().values()) == sum(
        t.numel() * 4 for t in _model_reference(chain["reference"]).values())
    assert main(["verify", str(checkpoint)]) == 0


def test_async_save_writes_the_same_files(chain):
    sync, background = chain["ckpt"] / "a.ckpt", chain["ckpt"] / "async.ckpt"
    files = sorted(p.relative_to(sync).as_posix() for p in sync.rglob("*") if p.is_file())
    assert files == sorted(p.relative_to(background).as_posix() for p in background.rglob("*") if p.is_file())
    for rel in files:
        if rel != "checkpoint_manifest.json":  # the manifest records the time of the save
            assert (sync / rel).read_bytes() == (background / rel).read_bytes(), rel


def test_dtensor_outside_sharded_is_refused_naming_component_tensor_and_sharded(chain):
    for result in chain["a"]:
        message = result["replicated"]
        assert message.startswith("DistributedUnsupportedStateError: preparing the checkpoint")
        assert "failed on ranks [0, 1]" in message
        assert ("component 'model': tensor '0.weight' at state['0.weight'] is a DTensor of global shape [7, 5]"
                in message)
        assert ("only a SHARDED component stores; declare StateComponent('model', ..., SharingPattern.SHARDED)"
                in message)
    assert not (chain["ckpt"] / "never.ckpt").exists()


def test_a_rank_failing_mid_save_leaves_the_previous_checkpoint(chain):
    for result in chain["a"]:
        assert "writing checkpoint files failed on rank 1" in result["fault"]
        assert "injected fault at save:write on rank 1" in result["fault"]
        assert result["listing"] == ["a.ckpt", "async.ckpt"]  # no staging directory left, nothing replaced
        assert result["loaded"] == []  # the step-3 state, not the step-4 one
    assert CheckpointManifest.load(chain["ckpt"] / "a.ckpt").step == 3


def test_global_shape_mismatch_names_tensor_and_both_shapes_on_every_rank(chain):
    for result in chain["a"]:
        message = result["shape"]
        assert message.startswith("DistributedCheckpointError: reading checkpoint")
        assert "failed on ranks [0, 1]" in message
        assert "tensor '0.weight' has global shape [7, 5] in the checkpoint but [8, 5] in the live state" in message


def test_corrupt_chunk_refused_on_every_rank_naming_it(chain):
    where = f"tensor '{CORRUPT_TENSOR}', chunk at offsets [4, 0] in model/chunks-00001.safetensors"
    for result in chain["a"]:
        # Plain modules on both ranks: both read the chunk and both find it corrupt.
        assert result["corrupt_plain"].startswith("DistributedCorruptCheckpointError: loading checkpoint")
        assert "failed on ranks [0, 1]" in result["corrupt_plain"] and where in result["corrupt_plain"]
        assert "the file is corrupt (altered after the save)" in result["corrupt_plain"]
        # FSDP2 on the same mesh: only rank 1 reads that chunk; the refusal still reaches rank 0.
        assert "failed on rank 1: " in result["corrupt_sharded"] and where in result["corrupt_sharded"]


def test_reshard_2_to_4_and_to_fsdp_x_tp(chain):
    b = chain["b"]
    placements = b[0]["tp_placements"]
    assert placements["0.weight"] == "(_StridedShard(dim=0, sf=2), Shard(dim=0))"
    assert placements["2.weight"] == "(Shard(dim=0), Shard(dim=1))"
    assert placements["2.bias"] == "(Shard(dim=0), Replicate())"
    assert placements["4.weight"] == "(Shard(dim=0),)"  # on the dp slice only
    for result in b:
        assert result["fsdp4"] == [] and result["tp"] == []
        # 2 -> 4 along dim 0: parts of chunks, read as whole blocks: at most one extra block each side.
        read = result["fsdp4_read"]
        assert read["needed"] <= read["read"] <= read["needed"] + 2 * BLOCK * read["pieces"]
    # Rank 3 holds rows 6.. of 7 under FSDP 4 and nothing of the 1-row and 3-row layers.
    assert b[3]["fsdp4_read"]["files"] == ["model/chunks-00001.safetensors"]


def test_fsdp_x_tp_replicas_share_the_writing_and_bytes_per_rank(chain):
    checkpoint = chain["ckpt"] / "b2x2.ckpt"
    holders = {0: {0, 1}, 1: {2, 3}}  # dp coordinate -> the tp ranks holding that dp piece
    writers: dict[int, set[int]] = {0: set(), 1: set()}
    for key, prefix in (("model", ""), ("optim", "state.")):
        index = load_index(checkpoint, key)
        # 2.bias is (Shard(0), Replicate()); 4.* live on the dp slice only: each dp piece has two holders.
        for name in (n for n in index.tensors if n.startswith((f"{prefix}2.bias", f"{prefix}4.")) and
                     not n.endswith(".step")):
            for chunk in index.tensors[name].chunks:
                dp = 0 if chunk.offsets[0] == 0 else 1
                assert chunk.writer in holders[dp], (name, chunk.offsets, chunk.writer)
                writers[dp].add(chunk.writer)
        assert _written_keys(checkpoint, key) == _expected_keys(index)
    # The tp replicas of dp row 0 take turns; row 1's shared pieces all go to rank 3, since rank 2
    # already writes more of the unshared (FSDP x TP) pieces.
    assert writers == {0: {0, 1}, 1: {3}}
    manifest = CheckpointManifest.load(checkpoint)
    by_rank: dict[int, int] = {}
    for entry in manifest.all_files():
        by_rank[entry.rank] = by_rank.get(entry.rank, 0) + entry.size
    chunk_bytes = {rank: load_index(checkpoint, "model").bytes_by_writer().get(rank, 0) +
                   load_index(checkpoint, "optim").bytes_by_writer().get(rank, 0) for rank in range(4)}
    print("b2x2 file bytes per rank", by_rank, "chunk bytes per rank", chunk_bytes)
    assert sum(chunk_bytes.values()) == 3 * 280 + 6 * 4  # weights, exp_avg, exp_avg_sq once each; six steps
    # Uneven shards (7 and 3 rows over 2 dp ranks): the dp row 0 ranks hold more of the unshared pieces.
    assert chunk_bytes == {0: 264, 1: 264, 2: 192, 3: 144}


def test_hsdp_writers_exact(chain):
    index = load_index(chain["ckpt"], "hsdp")
    writers = {(name, c.offsets): c.writer for name, t in index.tensors.items() for c in t.chunks}
    # Largest chunk first to the least-loaded holder (ties to the lowest rank): w0..w3 are 64-byte
    # pieces held by {0, 2} (rows 0-3) and {1, 3} (rows 4-7), s (36 bytes) by all, p (20) by all,
    # v (12 per piece) by {0, 1} and {2, 3}.
    assert writers == {
        ("w0", (0, 0)): 0, ("w0", (4, 0)): 1, ("w1", (0, 0)): 2, ("w1", (4, 0)): 3,
        ("w2", (0, 0)): 0, ("w2", (4, 0)): 1, ("w3", (0, 0)): 2, ("w3", (4, 0)): 3,
        ("s", (0, 0)): 0, ("p", (0,)): 1, ("v", (0,)): 1, ("v", (3,)): 2,
    }
    written = index.bytes_by_writer()
    assert written == {0: 164, 1: 160, 2: 140, 3: 128}
    assert chain["b"][0]["hsdp_saved"]["planned"] == written
    keys = _written_keys(chain["ckpt"], "hsdp")
    assert keys == _expected_keys(index) and sum(len(k) for k in keys.values()) == len(writers)
    largest = max(c.length for t in index.tensors.values() for c in t.chunks)
    assert max(written.values()) <= sum(written.values()) / 4 + largest
    from lightning_sharing.sharded import load_sharded

    expected = chain["b"][0]["hsdp_full"]
    live = {k: torch.zeros_like(v) for k, v in expected.items()}
    load_sharded(chain["ckpt"], index, live)
    assert differences(live, expected) == []


def test_partial_placement_refused(chain):
    message = chain["b"][0]["partial"]
    assert "tensor 'pending'" in message and "Partial" in message and "pending reduction" in message


def test_stages_split_over_groups(chain):
    b, checkpoint = chain["b"], chain["ckpt"] / "stages.ckpt"
    for result in b:
        assert result["stage_same_groups"] == [] and result["stage_no_groups"] == []
        assert "the checkpoint holds ['layers.1.scale', 'layers.1.weight'], which no rank's live state holds" in \
            result["stage_unheld"] and "failed on ranks [0, 1, 2, 3]" in result["stage_unheld"]
    manifest = CheckpointManifest.load(checkpoint)
    # Each stage's lowest rank writes its tensor (the only chunk) and its structure; nobody else writes.
    assert {(f.path, f.rank) for f in manifest.all_files()} == {
        ("stages/chunks-00000.safetensors", 0), ("stages/chunks-00001.safetensors", 1),
        ("stages/replicas-00000.json", 0), ("stages/replicas-00001.json", 1), ("stages/index.json", 0),
        ("stages.safetensors.index.json", 0)}
    # One Hugging Face index covers both stages, readable with plain safetensors.
    hf = json.loads((checkpoint / "stages.safetensors.index.json").read_text())
    assert hf["weight_map"] == {"layers.0.weight": "stages/chunks-00000.safetensors",
                                "layers.1.weight": "stages/chunks-00001.safetensors"}
    saved = {**b[0]["stage_saved"], **b[1]["stage_saved"]}
    for name, file in hf["weight_map"].items():
        assert torch.equal(load_file(checkpoint / file)[name], saved[name])
    # The same checkpoint into one unsplit state in this process.
    unsplit = Holder({name: torch.zeros(4, 3) if name.endswith("weight") else 0.0 for name in saved})
    CheckpointCoordinator([StateComponent("stages", unsplit, SharingPattern.SHARDED)]).load_checkpoint(checkpoint)
    assert differences(unsplit.state, saved) == []


def test_reshard_back_to_2_and_into_ddp(chain):
    c = chain["c"]
    for result in c:
        assert result["b4"] == [] and result["b2x2"] == [] and result["ddp"] == []
        assert result["repl_raw"] == [] and result["repl_numbered"] == []  # DDP's REPLICATED checkpoint into FSDP2
        assert result["repl_as_sharded"] == [] and result["sharded_as_repl"] == []  # either declared pattern
        refusal = ("component 'model': loading failed: tensor '0.bias': the checkpoint holds it whole with shape (7,), "
                   "but the live DTensor's global shape is (8,); the checkpoint is of another model")
        assert result["repl_other_shape"].count(refusal) == 2, result["repl_other_shape"]  # named for both ranks
        # DDP holds every tensor whole: each rank reads every byte of the model once.
        assert result["ddp_read"]["read"] == result["ddp_read"]["needed"] == 280
        assert result["b4_read"]["read"] == result["b4_read"]["needed"]  # 4 -> 2 along dim 0: whole chunks
    assert c[1]["b4_read"]["files"] == ["model/chunks-00002.safetensors", "model/chunks-00003.safetensors"]


def test_ddp_replicas_saved_once_with_an_hf_index_and_an_export_from_both_ranks(chain):
    checkpoint, expected = chain["ckpt"] / "ddp.ckpt", _model_reference(chain["reference"])
    index = load_index(checkpoint, "model")
    assert all(len(t.chunks) == 1 for t in index.tensors.values())  # plain tensors: one chunk each, written once
    assert set(index.bytes_by_writer()) == {0, 1}  # spread over both replicas
    hf = json.loads((checkpoint / "model.safetensors.index.json").read_text())
    loaded = {}
    for name, file in hf["weight_map"].items():
        loaded[name] = load_file(checkpoint / file)[name]
    assert differences(loaded, expected) == []
    for out in ("hf-ddp", "hf-b2x2"):
        assert differences(_read_export(chain["root"] / out), expected) == [], out
    written = [result["exported_here"] for result in chain["c"]]
    assert written[0] and written[1] and not set(written[0]) & set(written[1])  # both ranks wrote, no file twice
    assert sorted(written[0] + written[1]) == sorted(set(json.loads(
        (chain["root"] / "hf-b2x2" / "model.safetensors.index.json").read_text())["weight_map"].values()))


def _read_export(directory) -> dict[str, torch.Tensor]:
    index = json.loads((directory / "model.safetensors.index.json").read_text())
    tensors = {}
    for file in sorted(set(index["weight_map"].values())):
        tensors.update(load_file(directory / file))
    assert sorted(tensors) == sorted(index["weight_map"])
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in tensors.values())
    assert sorted(p.name for p in directory.iterdir()) == sorted({*index["weight_map"].values(),
                                                                  "model.safetensors.index.json"})
    return tensors


@pytest.mark.parametrize("key", ["a", "b2x2"])
def test_sharded_into_plain_module_in_one_process(chain, key):
    model = make_model(seed=7)
    optimizer = _optimizer(model, lr=0.5)
    CheckpointCoordinator(components(model, optimizer)).load_checkpoint(chain["ckpt"] / f"{key}.ckpt")
    assert differences(full_state(model, optimizer), chain["reference"]) == []
    assert optimizer.param_groups[0]["lr"] == 0.01


def test_cli_export_equals_the_full_tensors(chain, tmp_path, capsys):
    expected = _model_reference(chain["reference"])
    checkpoint = chain["ckpt"] / "b2x2.ckpt"
    assert main(["export", str(checkpoint), str(tmp_path / "hf"), "--max-shard-size", "150"]) == 0
    assert "exported component 'model'" in capsys.readouterr().out
    assert differences(_read_export(tmp_path / "hf"), expected) == []
    assert len(list((tmp_path / "hf").glob("*.safetensors"))) > 1
    assert main(["export", str(checkpoint), str(tmp_path / "bf16"), "--dtype", "bfloat16"]) == 0
    exported = _read_export(tmp_path / "bf16")
    assert differences(exported, {k: v.to(torch.bfloat16) for k, v in expected.items()}) == []
    assert main(["export", str(checkpoint), str(tmp_path / "hf"), "--component", "nope"]) == 1
    assert "the checkpoint has no component 'nope'" in " ".join(capsys.readouterr().out.split())


def test_inspect_shows_chunks_per_rank(chain, capsys):
    assert main(["inspect", str(chain["ckpt"] / "b2x2.ckpt")]) == 0
    out = capsys.readouterr().out
    index = load_index(chain["ckpt"] / "b2x2.ckpt", "model")
    total = sum(len(t.chunks) for t in index.tensors.values())
    assert f"model: {len(index.tensors)} tensors in {total} chunks" in out
    for rank in range(4):
        assert f"model/chunks-{rank:05d}.safetensors" in out and f"optim/chunks-{rank:05d}.safetensors" in out
