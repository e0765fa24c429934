"""A Ray-distributed SFT/GRPO training-and-ablation orchestrator for numeric regression with language models.

Reading order, along the data flow: config -> data -> modeling -> methods -> engine -> stages -> runtime ->
sweep -> tracking -> reporting (DESIGN.md); cli.py is the user's entry point."""

from orchestrator import legacy_paths

legacy_paths.install()
