import sys
from pathlib import Path

# Workers run in spawned processes, which import test modules and the harness by name.
sys.path.insert(0, str(Path(__file__).parent))

# The S3 test server and its fault proxy, for any test that asks for them (started lazily, once a session).
from support.s3 import fault_proxy, moto_server, s3, s3_prefix  # noqa: F401
