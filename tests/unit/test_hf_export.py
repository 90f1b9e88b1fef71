"""The export for ``transformers`` in one process: the manifest's ``hf_model`` record, the files ``from_pretrained``
loads exactly, ``--dtype`` and ``--prefix``, and models that are not transformers models exported as before.

The sharded (FSDP2, tensor parallel) and DDP cases run on two processes in tests/distributed/test_hf_roundtrip.py.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from support.hf import EMPTY_REPORT, SKIP_REASON, Wrapper, clean_report, from_pretrained, gpt2, logits, train_step
from support.launch import env

from lightning_sharing import (
    CheckpointCoordinator,
    CheckpointManifest,
    ManifestError,
    SharingPattern,
    StateComponent,
    export_checkpoint,
)
from lightning_sharing.checkpoint.hf_record import HFModelRecord
from lightning_sharing.cli import main

pytest.importorskip("transformers", reason=SKIP_REASON)


def _save(stateful, path: Path, pattern: SharingPattern = SharingPattern.REPLICATED) -> Path:
    CheckpointCoordinator([StateComponent("model", stateful, pattern)]).save_checkpoint(path)
    return path


def test_lightning_checkpoint_exports_what_transformers_loads_exactly(tmp_path: Path, capsys) -> None:
    """The issue's case: a LightningModule with ``self.model = GPT2LMHeadModel(config)``, saved by the strategy's
    checkpoint IO (the model's state dict in a holder that names the module), exported by the command line."""
    import lightning.pytorch as pl

    from lightning_sharing import SharingCheckpointIO

    class Module(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.model = gpt2(seed=0)
            self.probe = torch.nn.Linear(3, 2)  # not part of the transformers model: left out of the export

    module = Module()
    train_step(module, lambda ids: module.model(ids).logits)
    checkpoint = {"state_dict": module.state_dict(), "epoch": 0, "global_step": 1}
    SharingCheckpointIO().save_sharded(checkpoint, tmp_path / "step=1.ckpt", [], None, {}, module=module)

    record = CheckpointManifest.load(tmp_path / "step=1.ckpt").components["model"].hf_model
    assert record is not None
    assert (record.class_name, record.module, record.prefix) == (
        "GPT2LMHeadModel", "transformers.models.gpt2.modeling_gpt2", "model.")
    assert record.tied == {"lm_head.weight": "transformer.wte.weight"}
    assert record.config["architectures"] == ["GPT2LMHeadModel"] and record.config["n_embd"] == 32
    assert record.generation_config == json.loads(module.model.generation_config.to_json_string(use_diff=True))

    assert main(["inspect", str(tmp_path / "step=1.ckpt")]) == 0
    assert "model: transformers GPT2LMHeadModel under prefix 'model.'" in " ".join(capsys.readouterr().out.split())
    assert main(["export", str(tmp_path / "step=1.ckpt"), str(tmp_path / "hf")]) == 0
    assert sorted(p.name for p in (tmp_path / "hf").iterdir()) == [
        "config.json", "generation_config.json", "model-00001-of-00001.safetensors", "model.safetensors.index.json"]
    index = json.loads((tmp_path / "hf" / "model.safetensors.index.json").read_text())
    assert sorted(index["weight_map"]) == sorted(k for k in module.model.state_dict() if k != "lm_head.weight")
    assert index["metadata"] == {"total_size": index["metadata"]["total_size"], "format": "pt"}  # no "tied"
    model, info = from_pretrained(tmp_path / "hf")
    assert clean_report(info) == EMPTY_REPORT
    assert type(model).__name__ == "GPT2LMHeadModel" and model.lm_head.weight is model.transformer.wte.weight
    assert torch.equal(logits(model), logits(module.model))


def test_dtype_casts_the_weights_and_the_config(tmp_path: Path) -> None:
    wrapper = Wrapper(seed=0)
    train_step(wrapper)
    _save(wrapper, tmp_path / "step=1.ckpt")
    result = export_checkpoint(tmp_path / "step=1.ckpt", tmp_path / "hf", dtype="bfloat16")
    assert result.tensors == 28  # 29 keys, lm_head derived from the embedding
    assert json.loads((tmp_path / "hf" / "config.json").read_text())["dtype"] == "bfloat16"
    model, info = from_pretrained(tmp_path / "hf")
    assert clean_report(info) == EMPTY_REPORT
    assert model.dtype == torch.bfloat16
    trained = wrapper.model.state_dict()
    for name, value in model.state_dict().items():
        assert torch.equal(value, trained[name].to(torch.bfloat16)), name


def test_prefix_given_overrides_the_detected_one(tmp_path: Path) -> None:
    wrapper = Wrapper(seed=0)
    _save(wrapper, tmp_path / "step=1.ckpt")
    export_checkpoint(tmp_path / "step=1.ckpt", tmp_path / "hf", prefix="")
    index = json.loads((tmp_path / "hf" / "model.safetensors.index.json").read_text())
    assert sorted(index["weight_map"]) == sorted(k for k in wrapper.state_dict() if k != "model.lm_head.weight")
    assert main(["export", str(tmp_path / "step=1.ckpt"), str(tmp_path / "hf"), "--prefix", "probe."]) == 0
    index = json.loads((tmp_path / "hf" / "model.safetensors.index.json").read_text())
    assert sorted(index["weight_map"]) == ["bias", "weight"]


def test_a_model_that_is_not_a_transformers_model_exports_as_before(tmp_path: Path, capsys) -> None:
    model = torch.nn.Sequential(torch.nn.Embedding(5, 4), torch.nn.Linear(4, 5, bias=False))
    model[1].weight = model[0].weight  # tied, stored once
    _save(model, tmp_path / "step=1.ckpt")
    manifest = json.loads((tmp_path / "step=1.ckpt" / "checkpoint_manifest.json").read_text())
    assert "hf_model" not in manifest["components"]["model"]
    export_checkpoint(tmp_path / "step=1.ckpt", tmp_path / "hf")
    assert sorted(p.name for p in (tmp_path / "hf").iterdir()) == ["model-00001-of-00001.safetensors",
                                                                   "model.safetensors.index.json"]
    index = json.loads((tmp_path / "hf" / "model.safetensors.index.json").read_text())
    assert index == {"metadata": {"total_size": 80, "format": "pt", "tied": {"1.weight": "0.weight"}},
                     "weight_map": {"0.weight": "model-00001-of-00001.safetensors"}}
    # A prefix strips the names of any model; one that matches nothing is refused, saying what to do.
    export_checkpoint(tmp_path / "step=1.ckpt", tmp_path / "hf", prefix="1.")
    index = json.loads((tmp_path / "hf" / "model.safetensors.index.json").read_text())
    assert index["weight_map"] == {"weight": "model-00001-of-00001.safetensors"} and "tied" not in index["metadata"]
    assert main(["export", str(tmp_path / "step=1.ckpt"), str(tmp_path / "hf2"), "--prefix", "model."]) == 1
    assert "no tensor of the component is under the prefix 'model.'" in " ".join(capsys.readouterr().out.split())


def test_the_record_is_optional_and_strictly_parsed(tmp_path: Path) -> None:
    _save(Wrapper(seed=0), tmp_path / "step=1.ckpt")
    path = tmp_path / "step=1.ckpt" / "checkpoint_manifest.json"
    data = json.loads(path.read_text())
    record = data["components"]["model"]["hf_model"]
    assert HFModelRecord.from_json(record).to_json() == record
    older = json.loads(path.read_text())
    del older["components"]["model"]["hf_model"]  # a checkpoint saved before the field existed
    assert CheckpointManifest.from_json(older).components["model"].hf_model is None
    for field, value, message in [("tied", {"lm_head.weight": 3}, "tied"), ("config", [], "config is not"),
                                  ("class", "GPT2 LMHead", "class"), ("extra", 1, "unknown fields ['extra']")]:
        broken = json.loads(path.read_text())
        broken["components"]["model"]["hf_model"][field] = value
        with pytest.raises(ManifestError, match=rf"component 'model': hf_model .*{re.escape(message)}"):
            CheckpointManifest.from_json(broken)


def test_saving_never_imports_transformers(tmp_path: Path) -> None:
    script = (
        "import sys, torch\n"
        "from lightning_sharing import CheckpointCoordinator, SharingPattern, StateComponent\n"
        "model = torch.nn.Linear(2, 2)\n"
        f"CheckpointCoordinator([StateComponent('model', model, SharingPattern.REPLICATED)]).save_checkpoint("
        f"{str(tmp_path / 'step=1.ckpt')!r})\n"
        "assert 'transformers' not in sys.modules, 'transformers was imported'\n"
    )
    done = subprocess.run([sys.executable, "-c", script], env=env(), capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
