"""Training: global and local stages, the shared step loop, fine-tuning, torchrun, quality fitting."""
