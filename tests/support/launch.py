"""Run scripts as separate processes (torchrun, Lightning's own launcher) with a hard timeout.

Each launch gets its own process session so that a hang is ended by killing the whole group
(the launcher and every worker it started), and the test fails with the logs instead of blocking.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def env() -> dict[str, str]:
    # PYTHONFAULTHANDLER: a process that aborts prints every thread's Python stack, so a rare failure is diagnosable.
    result = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", PYTHONFAULTHANDLER="1")
    result["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), result.get("PYTHONPATH")) if p)
    return result


def start(args: list[str], log: Path, extra_env: dict[str, str] | None = None,
          drop_env: tuple[str, ...] = ()) -> subprocess.Popen:
    """Start ``python *args`` in its own session (``extra_env`` added to its environment, the variables named in
    ``drop_env`` removed from it); output goes to ``log``.

    The process runs in the log's folder (the test's temporary directory), so that whatever it writes to
    its working directory (Lightning's default ``checkpoints/``, say) never lands in the checkout.
    """
    environment = {name: value for name, value in {**env(), **(extra_env or {})}.items() if name not in drop_env}
    with open(log, "w") as handle:
        return subprocess.Popen([sys.executable, *args], cwd=log.parent, env=environment, stdout=handle,
                                stderr=subprocess.STDOUT, start_new_session=True)


def _descendants(pid: int) -> list[int]:
    """Every process below ``pid`` (torchrun starts its workers in sessions of their own)."""
    found: list[int] = []
    try:
        tasks = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return found
    for task in tasks:
        try:
            children = Path(f"/proc/{pid}/task/{task}/children").read_text().split()
        except OSError:
            continue
        for child in map(int, children):
            found += [child, *_descendants(child)]
    return found


def kill_tree(pid: int) -> None:
    """SIGKILL ``pid``'s process group and every descendant, wherever its session."""
    for victim in _descendants(pid):
        try:
            if os.getpgid(victim) == victim:  # a session/group leader: take its own workers with it
                os.killpg(victim, signal.SIGKILL)
            else:
                os.kill(victim, signal.SIGKILL)
        except ProcessLookupError:
            pass
    try:
        os.killpg(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def wait(procs: list[subprocess.Popen], logs: list[Path], timeout: float) -> list[int]:
    """Wait for every process; on timeout kill every process group and raise with the logs."""
    deadline = time.monotonic() + timeout
    try:
        for proc in procs:
            proc.wait(timeout=max(1.0, deadline - time.monotonic()))
    except subprocess.TimeoutExpired:
        for proc in procs:
            kill_tree(proc.pid)
            proc.wait()
        tails = "\n".join(f"--- {log}\n{log.read_text()[-4000:]}" for log in logs)
        raise AssertionError(f"did not finish within {timeout}s (hang?):\n{tails}") from None
    return [proc.returncode for proc in procs]


def run(args: list[str], log: Path, timeout: float = 150, expect: int | None = 0,
        drop_env: tuple[str, ...] = (), extra_env: dict[str, str] | None = None) -> str:
    """Run one process to completion; check its exit code unless ``expect`` is None; return its output."""
    proc = start(args, log, extra_env=extra_env, drop_env=drop_env)
    (code,) = wait([proc], [log], timeout)
    output = log.read_text()
    if expect is not None:
        assert code == expect, f"exit code {code}, expected {expect} ({log}):\n{output[-6000:]}"
    # Workers started by Lightning's launcher are in the same session: make sure none outlives the run.
    kill_tree(proc.pid)
    return output
