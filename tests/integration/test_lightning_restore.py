"""Lightning's restore habits on lightning_sharing directories (in the manner of Lightning's test_restore.py).

One 2-process job (tests/scripts/lightning_restore.py) trains, checkpoints and restores through new Trainers; the
tests here check what it reported and then load its directories in this process with ``load_from_checkpoint``,
which reads them through the hook documented in lightning_sharing/lightning/_compat.py.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from support.launch import ROOT, run

from lightning_sharing import SharingCheckpointIO

SCRIPT = ROOT / "tests" / "scripts" / "lightning_restore.py"


def _script_module() -> Any:
    spec = importlib.util.spec_from_file_location("lightning_restore", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules["lightning_restore"] = module  # the classes must be importable by their module name
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def job(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[dict[str, Any]], Any]:
    out = tmp_path_factory.mktemp("restore")
    run([str(SCRIPT), "--out", str(out)], out / "job.log", timeout=240)
    results = [json.loads((out / f"result-rank{r}.json").read_text()) for r in range(2)]
    return out, results, _script_module()


def _same_weights(module: torch.nn.Module, expected: dict[str, list[float]]) -> bool:
    actual = {k: v.flatten().tolist() for k, v in module.state_dict().items()}
    return actual == expected


def test_new_trainers_restore_never_fitted_models(job) -> None:
    _, results, _ = job
    for result in results:
        # test/validate/predict(ckpt_path=dir) on models that were never fitted: the fitted model's numbers.
        assert result["test_new"] == result["test_fitted"]
        assert result["validate_new"] == {"val_loss": result["test_fitted"]["test_loss"]}  # the same data
        assert result["predict_new"] == result["predict_fitted"]
        # strategy.connect(model) alone, then Lightning's restore: the module had no Trainer.
        assert result["connected_weights"] == result["final_weights"]
        assert result["best"].endswith("epoch=1-step=6.ckpt") and result["last"].endswith("last.ckpt")
    assert results[0]["final_weights"] == results[1]["final_weights"]


def test_missing_checkpoint_is_a_file_not_found_error(job) -> None:
    out, results, _ = job
    for result in results:
        missing = result["missing"]
        assert "FileNotFoundError" in missing["types"] and "CheckpointError" in missing["types"]
        assert f"Checkpoint file not found: {out / 'missing.ckpt'} does not exist" in missing["message"]


def test_load_from_checkpoint_directory(job) -> None:
    out, results, script = job
    expected = results[0]
    model = script.Model.load_from_checkpoint(out / "final.ckpt")
    assert dict(model.hparams) == {"width": 6, "lr": 0.1, "tag": "trained"}
    assert _same_weights(model, expected["final_weights"])
    # Every ModelCheckpoint directory loads too; the best one is the last epoch's here.
    best = script.Model.load_from_checkpoint(expected["best"])
    assert all(torch.equal(a, b) for a, b in zip(best.state_dict().values(), model.state_dict().values(),
                                                  strict=True))
    # Overriding kwargs win over the saved hyper-parameters.
    assert script.Model.load_from_checkpoint(str(out / "final.ckpt"), tag="override").hparams.tag == "override"
    # map_location in each of torch.load's forms.
    for location in ("cpu", torch.device("cpu"), {"cpu": "cpu"}, lambda storage, loc: storage):
        loaded = script.Model.load_from_checkpoint(out / "final.ckpt", map_location=location)
        assert _same_weights(loaded, expected["final_weights"]) and loaded.device == torch.device("cpu")


def test_load_from_checkpoint_strict(job) -> None:
    out, _, script = job

    class Wider(script.Model):
        def __init__(self, **kwargs: Any) -> None:
            super().__init__(**kwargs)
            self.extra = torch.nn.Linear(2, 2)

    with pytest.raises(RuntimeError, match=r'Missing key\(s\) in state_dict: "extra.weight", "extra.bias"'):
        Wider.load_from_checkpoint(out / "final.ckpt", strict=True)
    with pytest.warns(UserWarning, match=r"not in the checkpoint: \['extra.weight', 'extra.bias'\]"):  # Lightning's
        Wider.load_from_checkpoint(out / "final.ckpt", strict=False)


def test_state_dict_keys_in_module_order(job) -> None:
    out, results, _ = job
    checkpoint = SharingCheckpointIO().load_for_module(out / "final.ckpt")
    assert list(checkpoint["state_dict"]) == results[0]["final_keys"] == ["z_in.weight", "z_in.bias", "a_out.weight",
                                                                          "a_out.bias"]
    assert list(SharingCheckpointIO().load_checkpoint(out / "final.ckpt")["state_dict"]) == results[0]["final_keys"]


def test_datamodule_load_from_checkpoint(job) -> None:
    out, _, script = job
    datamodule = script.DataModule.load_from_checkpoint(out / "final.ckpt")
    assert dict(datamodule.hparams) == {"batch_size": 4, "seed": 3}
    assert datamodule.loads == 1  # its own state_dict(), restored


def test_hparams_type_comes_back_from_the_allow_list(job, caplog: pytest.LogCaptureFixture) -> None:
    from omegaconf import DictConfig, ListConfig

    out, results, script = job
    checkpoint = SharingCheckpointIO().load_for_module(out / "conf.ckpt")
    assert checkpoint["hparams_type"] is DictConfig
    # Stored by name in trainer.json (no pickle anywhere in the checkpoint).
    stored = json.dumps(json.loads((out / "conf.ckpt" / "trainer.json").read_text()))
    assert '["lightning_sharing.type", "omegaconf.dictconfig.DictConfig"]' in stored
    model = script.ConfModel.load_from_checkpoint(out / "conf.ckpt")
    assert isinstance(model.hparams, DictConfig) and isinstance(model.hparams.layers, ListConfig)
    assert model.hparams.width == 5 and list(model.hparams.layers) == [1, 2]
    assert _same_weights(model, results[0]["conf_weights"])

    # A name outside the allow-list is never imported: the hyper-parameters load as a plain dict.
    text = (out / "conf.ckpt" / "trainer.json").read_text()
    tampered = out / "tampered.ckpt"
    _copy_with(out / "conf.ckpt", tampered, "trainer.json",
               text.replace("omegaconf.dictconfig.DictConfig", "os.system"))
    with caplog.at_level(logging.WARNING):
        checkpoint = SharingCheckpointIO(verify="size").load_for_module(tampered)
    assert checkpoint["hparams_type"] is None
    assert "hparams_type 'os.system' is not an allowed hyper-parameter type" in caplog.text


def _copy_with(source: Path, target: Path, name: str, text: str) -> None:
    """Copy a checkpoint, replacing one file by ``text`` of the same length (so a size check passes)."""
    import shutil

    shutil.copytree(source, target)
    original = (source / name).read_text()
    assert len(text.encode()) <= len(original.encode())
    (target / name).write_text(text + " " * (len(original.encode()) - len(text.encode())))
