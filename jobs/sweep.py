"""Entrypoint for `ray job submit -- python jobs/sweep.py ABLATION.yaml [field=value ...]`.

Identical to `orchestrator sweep`; inside a Ray job it joins the job's cluster ($RAY_ADDRESS).
"""

import sys

from orchestrator.cli import main

if __name__ == "__main__":
    sys.exit(main(["sweep", *sys.argv[1:]]))
