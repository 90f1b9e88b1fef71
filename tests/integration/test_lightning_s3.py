"""The Trainer and Fabric adapters on S3 (moto's server on loopback): real 2-process jobs, every exit status checked.

One Lightning sequence (tests/scripts/lightning_s3.py, ``ModelCheckpoint(dirpath="s3://...", filename="{step}",
every_n_train_steps=5, save_top_k=2, monitor="step", mode="max", save_last=True)``), checked several ways:

1. ``reference``: 25 steps uninterrupted, credentials from the environment (``SharingStrategy()`` as it is);
2. ``killed``: the same run with ``ckpt_path="last"`` (nothing there yet: starts from scratch), SIGKILLed at
   step 17 (the step-15 checkpoints are committed, 2 steps are lost);
3. ``resumed``: ``fit(ckpt_path="last")`` to step 25: weights, AdamW moments, scheduler and metric must be
   ``torch.equal`` to the reference's; then, in this process, ``load_from_checkpoint`` of ``last.ckpt``;
4. ``fallback``: ``step=25.ckpt`` and ``last.ckpt`` damaged, ``fit(ckpt_path=<step=25 URL>)`` with
   ``fallback=True`` to step 30: falls back past both to ``step=20.ckpt``, which retention then must not delete;
   after ``fit``, retention is asked to remove the newest checkpoint, one outside the ModelCheckpoint directory and
   a prefix of foreign objects (all stay, training goes on), a save with per-call storage options (through a
   counting proxy), and ``validate(ckpt_path="best")``.

Jobs 2-4 get the endpoint and credentials only as ``SharingStrategy(storage_options=...)``: the AWS variables are
removed from their environment, so everything they do on S3 proves the options reached fsspec (ModelCheckpoint's
own listing included). A Fabric job (tests/scripts/fabric_s3.py) does the same with ``FabricSharingStrategy``.
Cost on a 2-core machine: about 20 s per Lightning job, 15 s for the Fabric one.
"""

from __future__ import annotations

import io
import json
import os
import sys
import uuid
from pathlib import Path
from typing import Any

import fsspec
import pytest
import torch
from safetensors.torch import load_file
from support.launch import ROOT, run
from support.s3 import BUCKET, FaultProxy

from lightning_sharing import CheckpointManifest
from lightning_sharing.storage import store_for

sys.path.insert(0, str(ROOT / "tests" / "scripts"))
sys.path.insert(0, str(ROOT / "examples"))
from fault_trials_s3 import audit, leftovers

SCRIPT = str(ROOT / "tests" / "scripts" / "lightning_s3.py")
FABRIC_SCRIPT = str(ROOT / "tests" / "scripts" / "fabric_s3.py")
STEPS, KILL_AT, FALLBACK_STEPS = 25, 17, 30
TIMEOUT_S = 300
NO_AWS_ENV = ("AWS_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE",
              "AWS_DEFAULT_REGION")


def _listing(url: str) -> dict[str, int | None]:
    """Every checkpoint name under ``url`` with its manifest's step (None: a prefix without a manifest)."""
    store = store_for(url)  # its listings are fresh: no cache to invalidate
    found: dict[str, int | None] = {}
    for location in store.list_checkpoint_candidates(store.normalize(url)):
        try:
            found[store.basename(location)] = CheckpointManifest.load(location).step
        except Exception:  # no manifest: reported as None
            found[store.basename(location)] = None
    return found


def _damage(url: str) -> str:
    """Delete the model weights of the checkpoint at ``url`` (its manifest stays: a corrupt, not a missing one)."""
    manifest = CheckpointManifest.load(url)
    store = store_for(url)
    victim = store.join(store.normalize(url), manifest.data_prefix or "", "model-00001-of-00001.safetensors")
    fs = fsspec.filesystem("s3", skip_instance_cache=True)
    fs.rm(victim)
    return victim


def _reports(out: Path) -> list[dict[str, Any]]:
    return [json.loads((out / f"report-rank{rank}.json").read_text()) for rank in (0, 1)]


@pytest.fixture(scope="module")
def jobs(moto_server, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    from lightning_ddp import TinyRegression

    work = tmp_path_factory.mktemp("lightning-s3")
    base = f"s3://{BUCKET}/lightning-{uuid.uuid4().hex[:12]}"
    result: dict[str, Any] = {"base": base, "run": f"{base}/run", "work": work}

    def train(name: str, url: str, *extra: str, steps: int = STEPS, expect: int = 0, from_env: bool = False) -> str:
        args = [SCRIPT, "--url", url, "--out", str(work / name), "--max-steps", str(steps), *extra]
        if not from_env:
            args += ["--endpoint", moto_server.endpoint_url]
        return run(args, work / f"{name}.log", timeout=TIMEOUT_S, expect=expect,
                   drop_env=() if from_env else NO_AWS_ENV)

    run_url = result["run"]
    result["reference_log"] = train("reference", f"{base}/reference", from_env=True)
    result["reference_listing"] = _listing(f"{base}/reference")
    # ckpt_path="last" from the first run on, as users write it: nothing there yet, so it starts from scratch.
    result["killed_log"] = train("killed", run_url, "--kill-at-step", str(KILL_AT), "--ckpt-path", "last", expect=-9)
    result["killed_listing"] = _listing(run_url)
    result["resumed_log"] = train("resumed", run_url, "--ckpt-path", "last")
    result["resumed_listing"] = _listing(run_url)
    result["resumed_audit"], result["resumed_leftovers"] = audit(run_url), leftovers(run_url)

    # load_from_checkpoint here (credentials from this process's environment), before last.ckpt is damaged.
    result["loaded_last"] = TinyRegression.load_from_checkpoint(f"{run_url}/last.ckpt").state_dict()

    result["damaged"] = [_damage(f"{run_url}/step=25.ckpt"), _damage(f"{run_url}/last.ckpt")]
    proxy = FaultProxy(moto_server.endpoint_url)  # forwards everything; counts what the per-call options sent it
    try:
        result["fallback_log"] = train("fallback", run_url, "--ckpt-path", f"{run_url}/step=25.ckpt", "--fallback",
                                       "--checks", "--proxy", proxy.url, steps=FALLBACK_STEPS)
        result["proxy_requests"] = list(proxy.requests)
    finally:
        proxy.close()
    result["fallback_listing"] = _listing(run_url)
    result["fallback_audit"] = audit(run_url)
    return result


def test_killed_run_resumes_from_last_on_s3_bit_exact(jobs: dict[str, Any]) -> None:
    run_url, work = jobs["run"], jobs["work"]
    # Retention on S3 during the runs: the two newest step checkpoints and last.ckpt, nothing else.
    assert jobs["reference_listing"] == {"last.ckpt": 25, "step=20.ckpt": 20, "step=25.ckpt": 25}
    assert jobs["killed_listing"] == {"last.ckpt": 15, "step=10.ckpt": 10, "step=15.ckpt": 15}
    assert jobs["resumed_listing"] == {"last.ckpt": 25, "step=20.ckpt": 20, "step=25.ckpt": 25}
    assert jobs["resumed_audit"] == [] and jobs["resumed_leftovers"] == []

    assert (f'ckpt_path="last" is set, but there is no complete last checkpoint in {run_url}. No checkpoint will be '
            "loaded.") in jobs["killed_log"]
    assert "Restored all states" not in jobs["killed_log"]
    assert f"Restored all states from the checkpoint at {run_url}/last.ckpt" in jobs["resumed_log"]
    for report in _reports(work / "resumed"):
        assert report["resumed_from"] == f"{run_url}/last.ckpt" and report["global_step"] == STEPS
        assert report["last"] == f"{run_url}/last.ckpt"
        assert report["aws_environment"] == []  # endpoint and credentials came as storage_options only
    for rank in (0, 1):
        expected = load_file(work / "reference" / f"final-rank{rank}.safetensors")
        actual = load_file(work / "resumed" / f"final-rank{rank}.safetensors")
        assert expected.keys() == actual.keys()
        assert any(k.startswith("optimizer.") for k in expected) and "metric.mean_value" in expected
        for key in expected:
            assert torch.equal(expected[key], actual[key]), f"rank {rank}: {key} differs after the resume from S3"
        summary = json.loads((work / "resumed" / f"final-rank{rank}.json").read_text())
        assert summary == json.loads((work / "reference" / f"final-rank{rank}.json").read_text())
        assert summary["scheduler"]["last_epoch"] == STEPS


def test_load_from_checkpoint_reads_an_s3_checkpoint_and_leaves_other_urls_to_lightning(jobs: dict[str, Any],
                                                                                        s3) -> None:
    from lightning_ddp import TinyRegression

    # last.ckpt was saved at the final step: the module's final weights.
    final = load_file(jobs["work"] / "resumed" / "final-rank0.safetensors")
    loaded = jobs["loaded_last"]
    assert sorted(loaded) == sorted(k[len("model."):] for k in final if k.startswith("model."))
    for key, value in loaded.items():
        assert torch.equal(value, final[f"model.{key}"]), key

    # A plain object (Lightning's own single-file format) is read by Lightning, as before.
    buffer = io.BytesIO()
    torch.save({"state_dict": loaded, "pytorch-lightning_version": "2.6.0",
                "hyper_parameters": {"lr": 0.05, "warmup": 4, "total": 25}}, buffer)
    plain = f"{jobs['base']}/plain.ckpt"
    s3.pipe(plain[len("s3://"):], buffer.getvalue())
    module = TinyRegression.load_from_checkpoint(plain, weights_only=True)
    assert all(torch.equal(value, loaded[key]) for key, value in module.state_dict().items())
    # The strategy resumes from such an object too (read through the store, with its storage options).
    from lightning_sharing import SharingStrategy

    strategy = SharingStrategy(storage_options={"endpoint_url": os.environ["AWS_ENDPOINT_URL"]})
    migrated = strategy.load_checkpoint(plain)
    assert all(torch.equal(value, loaded[key]) for key, value in migrated["state_dict"].items())
    assert strategy._resumed_from == plain
    with pytest.raises(FileNotFoundError):
        TinyRegression.load_from_checkpoint(f"{jobs['base']}/nothing-here.ckpt")


def test_fallback_on_s3_and_retention_keep_the_resumed_from_and_newest_checkpoints(jobs: dict[str, Any]) -> None:
    run_url, log = jobs["run"], jobs["fallback_log"]
    # Both damaged checkpoints refused, in order (newest first), then step=20.ckpt loaded.
    assert f"FALLING BACK: {run_url}/step=25.ckpt could not be loaded (" in log
    assert f"resuming from {run_url}/last.ckpt instead" in log
    assert f"resuming from {run_url}/step=20.ckpt instead" in log
    assert f"Restored all states from the checkpoint at {run_url}/step=20.ckpt" in log
    reports = _reports(jobs["work"] / "fallback")
    for report in reports:
        assert report["resumed_from"] == f"{run_url}/step=20.ckpt" and report["global_step"] == FALLBACK_STEPS
        assert report["aws_environment"] == []
    # Top-2 retention wanted step=20.ckpt gone at step 30; it is what training resumed from.
    assert f"not removing checkpoint {run_url}/step=20.ckpt: training resumed from it" in log
    assert reports[0]["best_k"] == [f"{run_url}/step=25-v1.ckpt", f"{run_url}/step=30.ckpt"]
    # step=25.ckpt existed (damaged) when step 25 came again: ModelCheckpoint's own listing saw it through the
    # strategy's storage options and chose step=25-v1.ckpt.
    assert jobs["fallback_listing"] == {"last.ckpt": 30, "notes.ckpt": None, "step=20.ckpt": 20, "step=25.ckpt": 25,
                                        "step=25-v1.ckpt": 25, "step=30.ckpt": 30}
    # Only the damaged step=25.ckpt fails verification; last.ckpt was replaced by complete saves since.
    assert jobs["fallback_audit"] and all(problem.startswith("step=25.ckpt: ") for problem in jobs["fallback_audit"])


def test_retention_refusals_on_s3_are_logged_and_training_goes_on(jobs: dict[str, Any]) -> None:
    run_url, base, log = jobs["run"], jobs["base"], jobs["fallback_log"]
    removals = _reports(jobs["work"] / "fallback")[0]["removals"]
    assert removals["newest"]["target"] == f"{run_url}/last.ckpt"
    assert all(removal["still_there"] for removal in removals.values()), removals
    assert f"not removing checkpoint {run_url}/last.ckpt: it is the newest complete checkpoint in its directory" in log
    assert (f"not removing checkpoint {base}/manual/through-proxy.ckpt: it is outside the ModelCheckpoint directory "
            f"({run_url})") in log
    assert (f"ERROR lightning_sharing.lightning.checkpoint_io: not removing checkpoint {run_url}/notes.ckpt: refusing "
            f"to remove {run_url}/notes.ckpt: it is not a lightning_sharing checkpoint (it holds readme.txt)") in log


def test_per_call_storage_options_replace_the_strategys_for_that_save(jobs: dict[str, Any]) -> None:
    requests = jobs["proxy_requests"]
    puts = [path for method, path in requests if method == "PUT"]
    assert any(path.endswith("/manual/through-proxy.ckpt/checkpoint_manifest.json") for path in puts), puts
    # Nothing else went through the proxy: not the strategy's other save, not training's checkpoints.
    assert all("/manual/" in path or "prefix=" in path for _, path in requests), requests
    assert not [path for _, path in requests if "direct.ckpt" in path or "run/" in path or "run%2F" in path]
    assert CheckpointManifest.load(f"{jobs['base']}/manual/direct.ckpt").step == FALLBACK_STEPS


def test_validate_best_loads_the_best_checkpoint_from_s3(jobs: dict[str, Any]) -> None:
    for report in _reports(jobs["work"] / "fallback"):
        assert report["validated_from"] == f"{jobs['run']}/step=30.ckpt"
        assert set(report["validate"]) == {"val_loss"}
    assert f"Loaded model weights from the checkpoint at {jobs['run']}/step=30.ckpt" in jobs["fallback_log"]


def test_fabric_saves_finds_and_loads_on_s3_with_explicit_storage_options(moto_server, tmp_path: Path) -> None:
    url = f"s3://{BUCKET}/fabric-{uuid.uuid4().hex[:12]}"
    run([FABRIC_SCRIPT, "--url", url, "--endpoint", moto_server.endpoint_url, "--out", str(tmp_path)],
        tmp_path / "fabric.log", timeout=TIMEOUT_S, drop_env=NO_AWS_ENV)
    for report in _reports(tmp_path):
        assert report["aws_environment"] == []
        assert report["latest"] == f"{url}/step=2.ckpt" and report["loaded_step"] == 2
        assert report["latest_differs"] == [] and report["tag_equal"]
        assert report["step1_keys"] == ["model", "optimizer", "step", "tag"] and report["step1_differs"] == []
        assert report["step1_vs_step2"]  # the two checkpoints hold different states
    manifest = CheckpointManifest.load(f"{url}/step=2.ckpt")
    assert manifest.world_size == 2 and manifest.step == 2
    assert sorted({f.rank for f in manifest.components["tag"].files}) == [0, 1]
    assert audit(url) == [] and leftovers(url) == []


# ---------------------------------------------------------------------- in-process (no process group)
def test_storage_options_arguments_are_checked() -> None:
    from lightning_sharing import ComponentDeclarationError, SharingCheckpointIO, SharingStrategy

    options = {"endpoint_url": "http://127.0.0.1:1", "anon": True}
    strategy = SharingStrategy(storage_options=options)
    assert strategy.storage_options == options and strategy.checkpoint_io.storage_options == options
    io_options = SharingStrategy(checkpoint_io=SharingCheckpointIO(storage_options=options)).storage_options
    assert io_options == options
    with pytest.raises(TypeError, match=r"storage_options must be a dict of fsspec filesystem arguments .* not str"):
        SharingStrategy(storage_options="anon")
    with pytest.raises(ComponentDeclarationError, match=r"SharingStrategy\(storage_options=...\) and its "
                                                        r"SharingCheckpointIO\(storage_options=...\) differ"):
        SharingStrategy(storage_options={"anon": True}, checkpoint_io=SharingCheckpointIO(storage_options=options))
    # For URLs only: a local path gets none (the default is no mistake there), a URL gets them.
    io = strategy.checkpoint_io
    assert io.storage_options_for("runs/last.ckpt") is None
    assert io.storage_options_for("s3://bucket/run/last.ckpt") == options
    assert io.storage_options_for("s3://bucket/run/last.ckpt", {"anon": False}) == {"anon": False}


def test_the_next_hpc_checkpoint_on_an_object_store_counts_complete_names_only() -> None:
    from lightning_sharing.lightning.preemption import hpc_checkpoint_path

    root = f"memory://hpc-{uuid.uuid4().hex[:8]}"
    store = store_for(root)
    for name in ("hpc_ckpt_3.ckpt/checkpoint_manifest.json", ".hpc_ckpt_9.ckpt/x", "hpc_ckpt_2.ckpt/x", "notes/x"):
        with store.open_write(f"{root}/{name}") as sink:
            sink.write(b"{}")
    assert hpc_checkpoint_path(root) == f"{root}/hpc_ckpt_4.ckpt"
    assert hpc_checkpoint_path(f"memory://empty-{uuid.uuid4().hex[:8]}/").endswith("/hpc_ckpt_1.ckpt")
