"""Training: the loop, its state and checkpoints, distributed runs, run folders."""
