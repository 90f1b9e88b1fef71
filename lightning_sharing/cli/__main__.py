"""``python -m lightning_sharing.cli``: the same as the ``lightning-sharing`` console script."""

import sys

from lightning_sharing.cli import main

sys.exit(main())
