import os

# One thread per process on CPU (oversubscription makes small-model steps far slower), and keep
# every test's Ray/MLflow state inside its own temporary folders.
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("RAY_DISABLE_USAGE_STATS", "1")

import torch  # noqa: E402

torch.set_num_threads(1)
