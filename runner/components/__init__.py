"""What is trained: models, losses, data, your data, the loader, optimizers (one class, one YAML each)."""
