"""Shared-memory files of read-once loads: a file whose writer died is removed by the next load, a live one never.

Real processes and real ``flock``s; the directory is a temporary one instead of ``/dev/shm`` (same calls).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from lightning_sharing.distributed import node_files
from lightning_sharing.distributed.node_files import NodeFiles, remove_stale_files

_WRITER = """
import sys, time
from lightning_sharing.distributed import node_files
node_files.SHARED_MEMORY = sys.argv[1]
files = node_files.NodeFiles("tok")
assert files.put(0, "7", b"payload")
print("written", flush=True)
time.sleep(600)
"""


def _age(path: Path, seconds: float) -> None:
    then = time.time() - seconds
    os.utime(path, (then, then))


def test_a_dead_writers_file_is_removed_and_a_live_or_fresh_one_is_kept(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setattr(node_files, "SHARED_MEMORY", str(tmp_path))
    writer = subprocess.Popen([sys.executable, "-c", _WRITER, str(tmp_path)], stdout=subprocess.PIPE, text=True)
    try:
        assert writer.stdout is not None and writer.stdout.readline().strip() == "written"
        written = tmp_path / "lightning-sharing-tok-0-7"
        assert written.read_bytes() == b"payload"
        _age(written, 3600)
        assert remove_stale_files(str(tmp_path)) == []  # its writer is alive and holds its lock
        assert written.exists()
        writer.send_signal(signal.SIGKILL)  # dies without removing it, as an OOM-killed rank would
        assert writer.wait(timeout=30) == -signal.SIGKILL
    finally:
        if writer.poll() is None:
            writer.kill()
            writer.wait()
    fresh = tmp_path / "lightning-sharing-other-1-0"
    fresh.write_bytes(b"just created")  # unlocked but new: perhaps a writer between create and lock
    unrelated = tmp_path / "someone-else"
    unrelated.write_bytes(b"x")
    _age(unrelated, 3600)
    # The next load's NodeFiles sweeps on creation.
    NodeFiles("next")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["lightning-sharing-other-1-0", "someone-else"]


def test_a_file_is_locked_while_it_exists_and_released_when_removed(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setattr(node_files, "SHARED_MEMORY", str(tmp_path))
    files = NodeFiles("tok")
    assert files.put(2, "0", b"abc")
    path = Path(files.path(2, "0"))
    _age(path, 3600)
    assert remove_stale_files(str(tmp_path)) == [] and path.exists()  # the writer's own lock counts too
    assert bytes(files.get(2, "0", 3)) == b"abc"
    files.remove()
    assert not path.exists() and files.written() == []
