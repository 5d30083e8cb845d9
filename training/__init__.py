"""Training: the DDP entry point a PyTorchJob runs, the model, data loading and checkpoints."""
