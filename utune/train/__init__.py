"""Training: datasets, the loop, checkpoints, distributed runs."""
