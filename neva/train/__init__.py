"""Training: optimizer (optim), step (compute_grads / train_step), precision, remat, lora, checkpoint."""
