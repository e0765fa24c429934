"""Entrypoint for `ray job submit -- python jobs/tables.py [ARGS ...]`.

Identical to `orchestrator tables`: reads the MLflow store ($MLFLOW_TRACKING_URI or the local one)
and writes the paper tables.
"""

import sys

from orchestrator.cli import main

if __name__ == "__main__":
    sys.exit(main(["tables", *sys.argv[1:]]))
