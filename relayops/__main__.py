"""``python -m relayops``: the command line (see relayops/cli.py)."""
import sys

from .cli import main

sys.exit(main())
