"""The Hugging Face round trip on a real 2-rank gloo job: what ``transformers`` loads is exactly what was trained.

One launched job (``_job``, two processes), checked several ways:
  DDP: a wrapper module (``self.model`` = a tiny GPT-2, tied embeddings) trained one step under DDP, saved
    REPLICATED with the DDP wrapper as the stateful, with the Hugging Face export written by both ranks
    (``export_hf``, small shards);
  FSDP2: the same wrapper under ``fully_shard``, trained one step, saved SHARDED through ``ShardedModuleState``;
  TP: a tiny Llama split by ``parallelize_module`` (column / row parallel), saved SHARDED as the model itself;
  import: the DDP export loaded with ``load_hf_weights`` into a fresh FSDP2 wrapper and a fresh DDP one (prefix
    ``model.``), and a ``save_pretrained`` directory into a fresh TP Llama; a wrong prefix fails on both ranks,
    naming the keys.
Then, in this process: ``from_pretrained`` of each export (the FSDP2 and TP ones written by the command line) loads
with an empty report and gives logits ``torch.equal`` to the training module's; the imported models' logits equal
the originals'.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from support.dist_harness import run_distributed
from support.hf import (
    EMPTY_REPORT,
    SKIP_REASON,
    Wrapper,
    clean_report,
    from_pretrained,
    llama,
    logits,
    train_step,
)

from lightning_sharing import CheckpointManifest
from lightning_sharing.cli import main

pytest.importorskip("transformers", reason=SKIP_REASON)

_TP_LINEARS = {"self_attn.q_proj": "col", "self_attn.k_proj": "col", "self_attn.v_proj": "col",
               "self_attn.o_proj": "row", "mlp.gate_proj": "col", "mlp.up_proj": "col", "mlp.down_proj": "row"}


def _fsdp(module: Wrapper, mesh: Any) -> Wrapper:
    from torch.distributed.fsdp import fully_shard

    for block in module.model.transformer.h:
        fully_shard(block, mesh=mesh)
    fully_shard(module.model, mesh=mesh)  # its class becomes FSDPGPT2LMHeadModel
    fully_shard(module, mesh=mesh)
    return module


def _tp(model: Any, mesh: Any) -> Any:
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

    plan = {f"model.layers.{i}.{name}": ColwiseParallel() if kind == "col" else RowwiseParallel()
            for i in range(len(model.model.layers)) for name, kind in _TP_LINEARS.items()}
    return parallelize_module(model, mesh, plan)


def _job(rank: int, world: int, root: str) -> dict[str, Any]:
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.nn.parallel import DistributedDataParallel

    from lightning_sharing import (
        CheckpointCoordinator,
        DistributedCheckpointError,
        HFExport,
        SharingPattern,
        StateComponent,
        load_hf_weights,
    )
    from lightning_sharing.statefuls.modules import ShardedModuleState

    out: dict[str, Any] = {}
    mesh = init_device_mesh("cpu", (world,))
    # DDP, the DDP wrapper itself declared (its keys start with "module.model.").
    wrapper = Wrapper(seed=0)
    ddp = DistributedDataParallel(wrapper)
    train_step(ddp)
    out["ddp_logits"] = logits(wrapper)
    CheckpointCoordinator([StateComponent("model", ddp, SharingPattern.REPLICATED)]).save_checkpoint(
        f"{root}/ddp.ckpt", export_hf=HFExport(f"{root}/hf-ddp", max_shard_size=40_000))
    # FSDP2, through ShardedModuleState (keys "model.", as get_model_state_dict gives them).
    sharded = _fsdp(Wrapper(seed=0), mesh)
    train_step(sharded)
    out["fsdp_logits"] = logits(sharded)
    CheckpointCoordinator([StateComponent("model", ShardedModuleState(sharded), SharingPattern.SHARDED)]
                          ).save_checkpoint(f"{root}/fsdp.ckpt")
    # Tensor parallel: the transformers model itself is the stateful (no prefix).
    plain = llama(seed=1)
    out["tp_plain_logits"] = logits(plain)
    if rank == 0:
        plain.save_pretrained(f"{root}/hf-llama")  # what transformers writes, for the import below
    parallel = _tp(plain, mesh)
    out["tp_logits"] = logits(parallel)
    CheckpointCoordinator([StateComponent("model", parallel, SharingPattern.SHARDED)]).save_checkpoint(
        f"{root}/tp.ckpt")
    dist.barrier()  # hf-llama is written
    # Import: the DDP export into a fresh FSDP2 wrapper, transformers' own files into a fresh TP Llama.
    fresh = _fsdp(Wrapper(seed=7), mesh)
    result = load_hf_weights(fresh, f"{root}/hf-ddp", prefix="model.")
    out["fsdp_import"] = {"logits": logits(fresh), "missing": result.missing, "unexpected": result.unexpected,
                          "loaded": len(result.loaded), "tied": fresh.model.lm_head.weight is
                          fresh.model.transformer.wte.weight}
    fresh_ddp = Wrapper(seed=5)
    load_hf_weights(DistributedDataParallel(fresh_ddp), f"{root}/hf-ddp", prefix="model.")  # DDP's module. unwrapped
    out["ddp_import"] = logits(fresh_ddp)
    fresh_tp = _tp(llama(seed=9), mesh)
    result = load_hf_weights(fresh_tp, f"{root}/hf-llama")
    out["tp_import"] = {"logits": logits(fresh_tp), "missing": result.missing, "unexpected": result.unexpected}
    try:
        load_hf_weights(_fsdp(Wrapper(seed=3), mesh), f"{root}/hf-ddp", prefix="net.")
    except DistributedCheckpointError as exc:
        out["wrong_prefix"] = str(exc)
    return out


@pytest.fixture(scope="module")
def job(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[dict[str, Any]]]:
    root = tmp_path_factory.mktemp("hf")
    return root, run_distributed(_job, 2, str(root), timeout=180)


def _check_load(path: Path, expected: torch.Tensor) -> Any:
    model, info = from_pretrained(path)
    assert clean_report(info) == EMPTY_REPORT
    assert model.dtype == torch.float32
    assert torch.equal(logits(model), expected)
    return model


def test_ddp_export_written_by_both_ranks_loads_exactly(job) -> None:
    root, results = job
    index = json.loads((root / "hf-ddp" / "model.safetensors.index.json").read_text())
    assert "tied" not in index["metadata"]
    assert "lm_head.weight" not in index["weight_map"] and "transformer.wte.weight" in index["weight_map"]
    assert not any(name.startswith(("model.", "module.", "probe")) for name in index["weight_map"])
    assert len(set(index["weight_map"].values())) > 2  # several shards, divided between the two ranks
    config = json.loads((root / "hf-ddp" / "config.json").read_text())
    assert config["architectures"] == ["GPT2LMHeadModel"] and config["dtype"] == "float32"
    assert (root / "hf-ddp" / "generation_config.json").is_file()
    record = CheckpointManifest.load(root / "ddp.ckpt").components["model"].hf_model
    assert record.prefix == "module.model."  # the DDP wrapper was declared: its state dict keeps "module."
    model = _check_load(root / "hf-ddp", results[0]["ddp_logits"])
    assert model.lm_head.weight is model.transformer.wte.weight  # the tie holds after loading
    assert torch.equal(results[0]["ddp_logits"], results[1]["ddp_logits"])


def test_fsdp2_checkpoint_exports_exactly(job, tmp_path: Path) -> None:
    root, results = job
    assert main(["export", str(root / "fsdp.ckpt"), str(tmp_path / "hf")]) == 0
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert config["architectures"] == ["GPT2LMHeadModel"]  # the transformers class, not fully_shard's FSDP class
    record = CheckpointManifest.load(root / "fsdp.ckpt").components["model"].hf_model
    assert (record.prefix, record.tied) == ("model.", {"lm_head.weight": "transformer.wte.weight"})
    index = json.loads((tmp_path / "hf" / "model.safetensors.index.json").read_text())
    assert "lm_head.weight" not in index["weight_map"] and "tied" not in index["metadata"]
    _check_load(tmp_path / "hf", results[0]["fsdp_logits"])


def test_tensor_parallel_checkpoint_exports_exactly(job, tmp_path: Path) -> None:
    root, results = job
    assert main(["export", str(root / "tp.ckpt"), str(tmp_path / "hf")]) == 0
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"]
    record = CheckpointManifest.load(root / "tp.ckpt").components["model"].hf_model
    assert (record.prefix, record.tied) == ("", {})
    model = _check_load(tmp_path / "hf", results[0]["tp_plain_logits"])
    assert model.lm_head.weight is not model.model.embed_tokens.weight  # untied, both written


def test_import_into_fsdp2_ddp_and_tensor_parallel(job) -> None:
    _, results = job
    for rank, result in enumerate(results):
        imported = result["fsdp_import"]
        assert (imported["missing"], imported["unexpected"], imported["loaded"]) == ([], [], 29), rank
        assert imported["tied"], rank
        assert torch.equal(imported["logits"], results[0]["ddp_logits"]), rank
        assert torch.equal(result["ddp_import"], results[0]["ddp_logits"]), rank
        assert (result["tp_import"]["missing"], result["tp_import"]["unexpected"]) == ([], []), rank
        assert torch.equal(result["tp_import"]["logits"], result["tp_logits"]), rank


def test_wrong_prefix_fails_on_every_rank_naming_the_keys(job) -> None:
    _, results = job
    for result in results:
        message = result["wrong_prefix"]
        assert "failed on ranks [0, 1]" in message
        assert "the module lacks ['transformer.h.0.attn.c_attn.bias'" in message
        assert "under the prefix 'model.': pass prefix='model.'" in message
