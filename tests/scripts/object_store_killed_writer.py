"""Streams one 12 MiB object to URL in 5 MiB parts with the object client CLIENT; run with
LIGHTNING_SHARING_FAULTS=save:write@0:kill to be SIGKILLed mid-upload
(by tests/distributed/test_object_store_processes.py).

    python object_store_killed_writer.py URL CLIENT
"""

from __future__ import annotations

import os
import sys

from lightning_sharing.storage import object_files, object_store

MIB = 1024 * 1024

if __name__ == "__main__":
    object_files.PART_SIZE = 5 * MIB
    store = object_store.ObjectStore.for_url(sys.argv[1], {"client": sys.argv[2]})
    with store.open_write(sys.argv[1]) as sink:
        sink.write(os.urandom(6 * MIB))
        sink.write(os.urandom(6 * MIB))
    print("written")
