"""Entrypoint for `ray job submit -- python jobs/train.py [CONFIG] [field=value ...]`.

Identical to `orchestrator train`; inside a Ray job it joins the job's cluster ($RAY_ADDRESS).
"""

import sys

from orchestrator.cli import main

if __name__ == "__main__":
    sys.exit(main(["train", *sys.argv[1:]]))
