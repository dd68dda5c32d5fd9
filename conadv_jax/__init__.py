"""Concurrent Adversarial Learning (ConAdv) for large-batch training in JAX."""
