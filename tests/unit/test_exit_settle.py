"""distributed/exit.py: the exit hook waits while another thread of the process runs, and only then.

The threads here run a long matrix product, which holds no GIL (as a gloo worker does), or wait on an event
(idle, as gloo's threads do between collectives). What is asserted is what the hook saw, never how long it took.
"""

from __future__ import annotations

import subprocess
import sys
import threading

import torch
from support.launch import ROOT, env

from lightning_sharing.distributed.exit import settle_native_threads


def _busy(started: threading.Event, stop: threading.Event, done: threading.Event, rounds: int | None) -> None:
    a = torch.randn(700, 700, generator=torch.Generator().manual_seed(0))
    started.set()
    count = 0
    while not stop.is_set() and (rounds is None or count < rounds):
        a = torch.mm(a, a).tanh_()
        count += 1
    done.set()


def _start(rounds: int | None) -> tuple[threading.Thread, threading.Event, threading.Event]:
    started, stop, done = threading.Event(), threading.Event(), threading.Event()
    thread = threading.Thread(target=_busy, args=(started, stop, done, rounds), daemon=True)
    thread.start()
    started.wait()
    return thread, stop, done


def test_waits_until_a_running_thread_has_finished() -> None:
    thread, _, done = _start(rounds=20)
    assert settle_native_threads(timeout=60.0) is True
    assert done.is_set()
    thread.join()


def test_gives_up_on_a_thread_that_keeps_running() -> None:
    thread, stop, done = _start(rounds=None)
    try:
        assert settle_native_threads(timeout=0.2) is False
        assert not done.is_set()
    finally:
        stop.set()
        thread.join()


def test_idle_threads_do_not_hold_it_up() -> None:
    release = threading.Event()
    idle = threading.Thread(target=release.wait, daemon=True)
    idle.start()
    try:
        assert settle_native_threads(timeout=60.0) is True
        assert idle.is_alive()
    finally:
        release.set()
        idle.join()


def test_registered_once_by_the_first_collective_call() -> None:
    code = """
import atexit, os
import torch.distributed as dist
from lightning_sharing.distributed import collectives
from lightning_sharing.distributed.exit import settle_at_exit
before = atexit._ncallbacks()
collectives.get_rank()                    # no process group: nothing registered
print(atexit._ncallbacks() - before)
dist.init_process_group("gloo", init_method="tcp://127.0.0.1:" + os.environ["PORT"], rank=0, world_size=1)
collectives.get_rank()
collectives.get_world_size()
settle_at_exit()
print(atexit._ncallbacks() - before)
dist.destroy_process_group()
"""
    from support.launch import free_port

    result = subprocess.run([sys.executable, "-c", code], env={**env(), "PORT": str(free_port())}, cwd=ROOT,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["0", "1"]
