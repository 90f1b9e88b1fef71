"""SLURM's side of preemption: the next ``hpc_ckpt_{n}.ckpt`` name and ``scontrol requeue``.

Example:
    >>> hpc_checkpoint_path("/nonexistent")
    '/nonexistent/hpc_ckpt_1.ckpt'
"""

from __future__ import annotations

import logging
import os
import re
import subprocess
from typing import Any

from lightning_sharing.integration.common import is_object_url
from lightning_sharing.storage import store_for

__all__ = ["hpc_checkpoint_path", "requeue_slurm_job"]

log = logging.getLogger(__name__)

_HPC_RE = re.compile(r"^hpc_ckpt_(\d+)\.ckpt$")


def hpc_checkpoint_path(root: str | os.PathLike[str], storage_options: dict[str, Any] | None = None) -> str:
    """Lightning's next ``hpc_ckpt_{n}.ckpt`` under ``root``, counting complete checkpoint names only.

    Lightning's own ``hpc_save_path`` takes every digit of every name containing ``hpc_ckpt_``, so a
    hidden staging directory (``.hpc_ckpt_2.ckpt.staging-<hex>``) would yield a nonsense number. ``root``
    may be an object-store URL (listed with ``storage_options``).

    Example:
        >>> hpc_checkpoint_path("/nonexistent")
        '/nonexistent/hpc_ckpt_1.ckpt'
    """
    text = os.fspath(root)
    names: list[str] = []
    if is_object_url(text):
        store = store_for(text, storage_options)
        text = store.normalize(text)
        names = [store.basename(location) for location in store.list_checkpoint_candidates(text)]
    elif os.path.isdir(text):
        names = os.listdir(text)
    numbers = [0] + [int(m.group(1)) for name in names if (m := _HPC_RE.match(name))]
    return f"{text.rstrip('/')}/hpc_ckpt_{max(numbers) + 1}.ckpt" if is_object_url(text) else \
        os.path.join(text, f"hpc_ckpt_{max(numbers) + 1}.ckpt")


def requeue_slurm_job() -> int | None:
    """``scontrol requeue`` this SLURM job (what Lightning does on the requeue signal); the exit status.

    Example:
        >>> requeue_slurm_job()  # doctest: +SKIP
    """
    array_job_id = os.environ.get("SLURM_ARRAY_JOB_ID")
    job_id = (f"{array_job_id}_{os.environ.get('SLURM_ARRAY_TASK_ID', '')}" if array_job_id
              else os.environ.get("SLURM_JOB_ID", ""))
    if not re.fullmatch(r"[0-9_-]+", job_id):
        log.warning("not requeuing: no valid SLURM job id in the environment (%r)", job_id)
        return None
    command = ["scontrol", "requeue", job_id]
    log.info("requeuing SLURM job %s", job_id)
    try:
        result = subprocess.call(command)
    except FileNotFoundError:
        # As Lightning does: scontrol may only be reachable through a shell (the job id is digits only).
        result = subprocess.call(" ".join(command), shell=True)
    if result == 0:
        log.info("requeued SLURM job %s", job_id)
    else:
        log.warning("requeuing SLURM job %s failed with exit status %d", job_id, result)
    return result
