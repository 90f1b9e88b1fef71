"""One contender of a race for the same objects (two run at once: tests/distributed/test_object_store_processes.py).

    python object_store_race.py URL CLIENT MODE KEYS TAG READY_FILE GO_FILE

``CLIENT`` is the object client (``fsspec`` or ``obstore``). ``MODE`` ``create``: each of ``KEYS`` objects under
URL is put create-only; ``replace``: each is read with its version first, then (after GO_FILE appears) replaced
only over that version. Prints one JSON line mapping each key to ``"won"`` or the refusal's message, and exits 0;
any other error exits non-zero. Each contender takes the keys in an order of its own (seeded by TAG).
"""

from __future__ import annotations

import json
import random
import sys
import time
from pathlib import Path

from lightning_sharing.errors import ObjectChangedError, ObjectExistsError
from lightning_sharing.storage.object_store import open_client


def main() -> None:
    url, client_kind, mode, keys, tag, ready, go = sys.argv[1:]
    client, root, _ = open_client(url, {"client": client_kind})
    names = [f"{root}/k{i:03d}/checkpoint_manifest.json" for i in range(int(keys))]
    versions = {name: client.get(name)[1] for name in names} if mode == "replace" else {}
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
            client.put(name, data, create=mode == "create", if_match=versions.get(name))
            outcome[name] = "won"
        except (ObjectExistsError, ObjectChangedError) as exc:
            outcome[name] = str(exc)
    print(json.dumps(outcome))


if __name__ == "__main__":
    main()
