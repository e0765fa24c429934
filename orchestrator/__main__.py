"""`python -m orchestrator ...`: the `orchestrator` command, for environments without its script on PATH."""

import sys

from orchestrator.cli import main

sys.exit(main())
