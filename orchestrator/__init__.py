"""Ray-distributed post-training and ablation orchestrator."""
