"""The method: ConAdv's train step, attacks, models, optimizer and mesh; jax, flax and optax only."""
