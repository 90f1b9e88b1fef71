import sys
from pathlib import Path

# Workers run in spawned processes, which import test modules and the harness by name.
sys.path.insert(0, str(Path(__file__).parent))
