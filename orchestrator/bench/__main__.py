"""`python -m orchestrator.bench _trl KIND SPEC RESULT`: the TRL side's subprocess entry point."""

import sys

from orchestrator.bench import main_trl

if len(sys.argv) > 1 and sys.argv[1] == "_trl":
    sys.exit(main_trl(sys.argv[2:]))
print("usage: orchestrator bench [--quick|--full] [--write-readme] [--grid SWEEP]", file=sys.stderr)
sys.exit(2)
