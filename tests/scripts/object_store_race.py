"""One contender of a race for the same objects (two run at once: tests/distributed/test_object_store_processes.py).

    python object_store_race.py URL MODE KEYS TAG READY_FILE GO_FILE

``MODE`` ``create``: each of ``KEYS`` objects under URL is put create-only; ``replace``: each is read with its
version first, then (after GO_FILE appears) replaced with ``put_if_match``. Prints one JSON line mapping each
key to ``"won"`` or the refusal's message, and exits 0; any other error exits non-zero. Each contender takes the
keys in an order of its own (seeded by TAG).
"""

from __future__ import annotations

import json
import random
import sys
import time
from pathlib import Path

from lightning_sharing.storage.object_store import (
    ObjectChangedError,
    ObjectExistsError,
    open_store,
    put_create_only,
    put_if_match,
    read_versioned,
)


def main() -> None:
    url, mode, keys, tag, ready, go = sys.argv[1:]
    fs, root = open_store(url)
    names = [f"{root}/k{i:03d}/checkpoint_manifest.json" for i in range(int(keys))]
    versions = {name: read_versioned(fs, name)[1] for name in names} if mode == "replace" else {}
    Path(ready).touch()
    deadline = time.monotonic() + 120
    while not Path(go).exists():
        if time.monotonic() > deadline:
            raise SystemExit("no go signal within 120 s")
        time.sleep(0.005)
    outcome: dict[str, str] = {}
    # Each contender takes the keys in its own order: one that fell behind on a key is not behind on all the rest.
    for name in random.Random(tag).sample(names, len(names)):
        data = f"written by {tag}".encode()
        try:
            if mode == "create":
                put_create_only(fs, name, data)
            else:
                put_if_match(fs, name, data, versions[name])
            outcome[name] = "won"
        except (ObjectExistsError, ObjectChangedError) as exc:
            outcome[name] = str(exc)
    print(json.dumps(outcome))


if __name__ == "__main__":
    main()
