"""Training: recipes, imbalance handling, data loading, the loop, checkpoints, the tracked run."""
