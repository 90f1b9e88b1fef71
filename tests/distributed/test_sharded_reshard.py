"""SHARDED state on real gloo process groups: FSDP2 / FSDP x TP saves, resharded loads, bit-exact.

One checkpoint chain, each step one launched job (the module fixture runs them once):
  A (2 ranks, FSDP2): train 3 AdamW steps, save model + optimizer ("a"); load into fresh FSDP2 modules
    and a fresh optimizer on the same mesh, train one more step on both; corrupt one byte of a copy
    and load it twice (every rank reading the chunk refuses it; the rank that does not read it loads).
  B (4 ranks): load "a" into FSDP2 over 4 ranks and into FSDP 2 x TP 2, save both ("b4", "b2x2");
    save an HSDP-style 2-D state whose Replicate dim shares the writing ("hsdp").
  C (2 ranks): load "b4" and "b2x2" back into FSDP2 over 2 ranks, and "b2x2" into DDP.
Then, in this process (no process group): "a" and "b2x2" into a plain module and optimizer.
Every load is compared with torch.equal on full_tensor() against the state saved in A.
"""

from __future__ import annotations

import shutil

import pytest
import torch
from safetensors import safe_open
from support.dist_harness import run_distributed
from support.sharded import (
    BLOCK,
    fsdp_model,
    fsdp_tp_model,
    full,
    load_index,
    load_into,
    make_model,
    model_and_optimizer_state,
    save_state,
    train,
)

CORRUPT_TENSOR = "model.0.weight"


def _assert_same(live: dict[str, torch.Tensor], reference: dict[str, torch.Tensor], what: str) -> None:
    assert sorted(live) == sorted(reference), what
    bad = [k for k in reference if not torch.equal(live[k], reference[k])]
    assert not bad, f"{what}: tensors differ after the round trip: {bad}"


def _optimizer(model: torch.nn.Module, lr: float = 0.01) -> torch.optim.Optimizer:
    return torch.optim.AdamW(model.parameters(), lr=lr)


def _try(fn) -> str:
    from lightning_sharing.errors import CorruptCheckpointError

    try:
        fn()
    except CorruptCheckpointError as exc:
        return f"CorruptCheckpointError: {exc}"
    return "ok"


def _job_a(rank: int, world: int, root) -> dict:
    import torch.distributed as dist

    model = fsdp_model(world)
    optimizer = _optimizer(model)
    train(model, optimizer, 3)
    tensors, _, holder = model_and_optimizer_state(model, optimizer)
    saved = save_state(root / "ckpt", "a", tensors)
    reference = full(tensors)
    groups = holder.state_dict()["param_groups"]
    held = sorted(k for k, v in tensors.items() if hasattr(v, "to_local") and v.to_local().numel())

    fresh = fsdp_model(world, seed=7)
    fresh_optimizer = _optimizer(fresh, lr=0.5)
    read = load_into(root / "ckpt", "a", fresh, fresh_optimizer, groups)
    live, _, _ = model_and_optimizer_state(fresh, fresh_optimizer)
    _assert_same(full(live), reference, "FSDP2 2 -> 2")
    lr = fresh_optimizer.param_groups[0]["lr"]
    train(model, optimizer, 1)
    train(fresh, fresh_optimizer, 1)
    after, _, _ = model_and_optimizer_state(model, optimizer)
    after_fresh, _, _ = model_and_optimizer_state(fresh, fresh_optimizer)
    _assert_same(full(after_fresh), full(after), "one more step after the load")

    # One flipped byte inside rank 1's chunk of CORRUPT_TENSOR, in a copy of the checkpoint.
    bad_root = root / "bad"
    if rank == 0:
        shutil.copytree(root / "ckpt", bad_root)
        chunk = next(c for c in load_index(bad_root, "a").tensors[CORRUPT_TENSOR].chunks if c.offsets[0] > 0)
        with open(bad_root / chunk.file, "r+b") as handle:
            handle.seek(chunk.begin + 5)
            byte = handle.read(1)
            handle.seek(chunk.begin + 5)
            handle.write(bytes([byte[0] ^ 0x01]))
    dist.barrier()
    # No collective below: each rank reads on its own and reports what it saw.
    plain = make_model(seed=7)
    corrupt_plain = _try(lambda: load_into(bad_root, "a", plain, _optimizer(plain), groups))
    sharded = fsdp_model(world, seed=7)
    corrupt_sharded = _try(lambda: load_into(bad_root, "a", sharded, _optimizer(sharded), groups))
    dist.barrier()
    return {"saved": saved, "read": read, "held": held, "lr": lr, "corrupt_plain": corrupt_plain,
            "corrupt_sharded": corrupt_sharded, "reference": reference if rank == 0 else None, "groups": groups}


def _job_b(rank: int, world: int, root, reference: dict, groups) -> dict:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor, Partial, Replicate, Shard, distribute_tensor

    from lightning_sharing.errors import UnsupportedStateError
    from lightning_sharing.sharded import plan_writes

    ckpt, out = root / "ckpt", {}
    model = fsdp_model(world)
    optimizer = _optimizer(model, lr=0.5)
    out["fsdp4_read"] = load_into(ckpt, "a", model, optimizer, groups)
    live, _, _ = model_and_optimizer_state(model, optimizer)
    _assert_same(full(live), reference, "FSDP2 2 -> 4")
    out["fsdp4_saved"] = save_state(ckpt, "b4", live)

    model = fsdp_tp_model()
    optimizer = _optimizer(model, lr=0.5)
    out["tp_read"] = load_into(ckpt, "a", model, optimizer, groups)
    live, _, _ = model_and_optimizer_state(model, optimizer)
    _assert_same(full(live), reference, "FSDP2 2 -> FSDP 2 x TP 2")
    out["tp_placements"] = {k: str(v.placements) for k, v in live.items() if hasattr(v, "placements")}
    out["tp_saved"] = save_state(ckpt, "b2x2", live)

    # HSDP-style: mesh [[0, 1], [2, 3]] as ("replicate", "shard").
    mesh = init_device_mesh("cpu", (2, 2), mesh_dim_names=("replicate", "shard"))
    torch.manual_seed(3)
    hsdp = {f"w{i}": distribute_tensor(torch.randn(8, 4), mesh, [Replicate(), Shard(0)]) for i in range(4)}
    hsdp["v"] = distribute_tensor(torch.randn(6), mesh, [Shard(0), Replicate()])
    hsdp["s"] = distribute_tensor(torch.randn(3, 3), mesh, [Replicate(), Replicate()])
    hsdp["p"] = torch.arange(5.0)  # a plain tensor: held by every rank
    out["hsdp_saved"] = save_state(ckpt, "hsdp", hsdp)
    hsdp_full = full(hsdp)  # a collective: every rank
    out["hsdp_full"] = hsdp_full if rank == 0 else None
    try:
        plan_writes({"pending": DTensor.from_local(torch.ones(2), mesh, [Partial(), Replicate()])})
        out["partial"] = "accepted"
    except UnsupportedStateError as exc:
        out["partial"] = str(exc)
    return out


def _job_c(rank: int, world: int, root, reference: dict, groups) -> dict:
    from torch.nn.parallel import DistributedDataParallel

    ckpt, out = root / "ckpt", {}
    for key in ("b4", "b2x2"):
        model = fsdp_model(world)
        optimizer = _optimizer(model, lr=0.5)
        out[key] = load_into(ckpt, key, model, optimizer, groups)
        live, _, _ = model_and_optimizer_state(model, optimizer)
        _assert_same(full(live), reference, f"{key} -> FSDP2 2")
    ddp = DistributedDataParallel(make_model(seed=7))
    optimizer = _optimizer(ddp, lr=0.5)
    out["ddp"] = load_into(ckpt, "b2x2", ddp, optimizer, groups)
    live, _, _ = model_and_optimizer_state(ddp, optimizer)
    _assert_same(full(live), reference, "FSDP 2 x TP 2 -> DDP 2")
    return out


@pytest.fixture(scope="module")
def chain(tmp_path_factory):
    root = tmp_path_factory.mktemp("sharded")
    a = run_distributed(_job_a, 2, root)
    reference, groups = a[0]["reference"], a[0]["groups"]
    b = run_distributed(_job_b, 4, root, reference, groups)
    c = run_distributed(_job_c, 2, root, reference, groups)
    return {"root": root / "ckpt", "a": a, "b": b, "c": c, "reference": reference, "groups": groups}


def _written_keys(root, key: str) -> dict[int, list[str]]:
    """The safetensors keys in each rank's chunk file, read with plain safetensors."""
    keys = {}
    for path in sorted((root / key).glob("chunks-*.safetensors")):
        with safe_open(str(path), "pt") as handle:
            keys[int(path.stem.split("-")[1])] = sorted(handle.keys())
    return keys


def test_fsdp2_same_mesh_round_trip(chain):
    a, index = chain["a"], load_index(chain["root"], "a")
    for result in a:
        assert result["lr"] == 0.01  # param groups restored into the fresh optimizer
        # 1-D FSDP: no replicas, so each rank writes exactly the DTensor pieces it holds.
        mine = {name for name, _ in result["saved"]["mine"] if not name.endswith(".step")}
        assert mine == set(result["held"])
        # Same mesh: every piece is a whole chunk, so whole blocks: nothing read beyond what is needed.
        assert result["read"]["read"] == result["read"]["needed"]
    # Rank 1 holds no row of the 1-row layer: an empty shard, nothing written for it there.
    assert "model.4.weight" not in a[1]["held"] and "model.4.weight" in a[0]["held"]
    assert [c.writer for c in index.tensors["model.4.weight"].chunks] == [0]
    # The plain AdamW step tensors (held by both ranks) are written once each, by one of them.
    steps = [name for name in index.tensors if name.endswith(".step")]
    assert len(steps) == 6 and all(len(index.tensors[n].chunks) == 1 for n in steps)
    keys = _written_keys(chain["root"], "a")
    for rank, names in keys.items():
        expected = sorted(c.key for t in index.tensors.values() for c in t.chunks if c.writer == rank)
        assert names == expected


def test_corrupt_byte_refused_by_every_rank_reading_it(chain):
    a = chain["a"]
    for rank in (0, 1):  # a plain module: both ranks read the corrupted chunk
        message = a[rank]["corrupt_plain"]
        assert message.startswith("CorruptCheckpointError: ")
        assert f"tensor '{CORRUPT_TENSOR}', chunk at offsets [4, 0] in a/chunks-00001.safetensors" in message
        assert "the file is corrupt (altered after the save)" in message
    # FSDP2 on the same mesh: only rank 1 reads that chunk; rank 0 reads other blocks of the same file
    # (the AdamW steps rank 1 wrote) and loads.
    assert "a/chunks-00001.safetensors" in a[0]["read"]["files"]
    assert a[0]["corrupt_sharded"] == "ok"
    assert f"tensor '{CORRUPT_TENSOR}', chunk at offsets [4, 0]" in a[1]["corrupt_sharded"]


def test_reshard_2_to_4_and_to_fsdp_x_tp(chain):
    b = chain["b"]
    placements = b[0]["tp_placements"]
    assert placements["model.0.weight"] == "(_StridedShard(dim=0, sf=2), Shard(dim=0))"
    assert placements["model.2.weight"] == "(Shard(dim=0), Shard(dim=1))"
    assert placements["model.2.bias"] == "(Shard(dim=0), Replicate())"
    assert placements["model.4.weight"] == "(Shard(dim=0),)"  # on the dp slice only
    for result in b:
        # 2 -> 4 along dim 0: parts of chunks, read as whole blocks: at most one extra block each side.
        read = result["fsdp4_read"]
        assert read["needed"] <= read["read"] <= read["needed"] + 2 * BLOCK * read["pieces"]
    # Rank 3 holds rows 6.. of 7 under FSDP 4 and nothing of the 1-row and 3-row layers.
    assert b[3]["fsdp4_read"]["files"] == ["a/chunks-00001.safetensors"]


def test_fsdp_x_tp_replicas_share_the_writing(chain):
    index = load_index(chain["root"], "b2x2")
    # model.2.bias is (Shard(0), Replicate()): each dp piece is held by both tp ranks of its dp row.
    # model.4.* live on the dp slice only; the other tp rank holds the same piece.
    holders = {0: {0, 1}, 1: {2, 3}}  # dp coordinate -> ranks
    shared = [n for n in index.tensors if n.startswith(("model.2.bias", "model.4.", "optim.state.2.bias.",
                                                        "optim.state.4."))
              and not n.endswith(".step")]
    writers: dict[int, set[int]] = {0: set(), 1: set()}
    for name in shared:
        for chunk in index.tensors[name].chunks:
            dp = 0 if chunk.offsets[0] == 0 else 1
            assert chunk.writer in holders[dp], (name, chunk.offsets, chunk.writer)
            writers[dp].add(chunk.writer)
    # The tp replicas of dp row 0 take turns; row 1's shared pieces all go to rank 3, since rank 2
    # already writes more of the unshared (FSDP x TP) pieces.
    assert writers == {0: {0, 1}, 1: {3}}
    assert index.bytes_by_writer() == {0: 264, 1: 264, 2: 192, 3: 144}
    keys = _written_keys(chain["root"], "b2x2")
    for rank, names in keys.items():
        assert names == sorted(c.key for t in index.tensors.values() for c in t.chunks if c.writer == rank)


def test_hsdp_writers_exact(chain):
    index = load_index(chain["root"], "hsdp")
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
    # Every chunk once, in its writer's file and nowhere else; no rank above the average plus one chunk.
    keys = _written_keys(chain["root"], "hsdp")
    assert keys == {r: sorted(c.key for t in index.tensors.values() for c in t.chunks if c.writer == r)
                    for r in range(4)}
    assert sum(len(k) for k in keys.values()) == len(writers)
    largest = max(c.length for t in index.tensors.values() for c in t.chunks)
    assert max(written.values()) <= sum(written.values()) / 4 + largest
    # Loading it back in this process as plain tensors gives the full tensors.
    from lightning_sharing.sharded import load_sharded

    expected = chain["b"][0]["hsdp_full"]
    live = {k: torch.zeros_like(v) for k, v in expected.items()}
    load_sharded(chain["root"], index, live)
    _assert_same(live, expected, "HSDP -> plain")


def test_partial_placement_refused(chain):
    message = chain["b"][0]["partial"]
    assert "tensor 'pending'" in message and "Partial" in message and "pending reduction" in message


def test_reshard_back_to_2_and_into_ddp(chain):
    c = chain["c"]
    for result in c:
        # DDP holds every tensor whole: each rank reads every byte of the model and optimizer once.
        assert result["ddp"]["read"] == result["ddp"]["needed"] == 864
        assert result["b4"]["read"] == result["b4"]["needed"]  # 4 -> 2 along dim 0: whole chunks
    assert c[1]["b4"]["files"] == ["b4/chunks-00002.safetensors", "b4/chunks-00003.safetensors"]


@pytest.mark.parametrize("key", ["a", "b2x2"])
def test_sharded_into_plain_module_in_one_process(chain, key):
    model = make_model(seed=7)
    optimizer = _optimizer(model, lr=0.5)
    load_into(chain["root"], key, model, optimizer, chain["groups"])
    live, _, _ = model_and_optimizer_state(model, optimizer)
    _assert_same(full(live), chain["reference"], f"{key} -> one plain process")
    assert optimizer.param_groups[0]["lr"] == 0.01
