"""Per-example losses and accuracies shared by the train step, the attack and evaluation."""
import jax
import jax.numpy as jnp
import optax


def cross_entropy(logits: jax.Array, labels: jax.Array,
                  label_smoothing: float = 0.0) -> jax.Array:
  """Per-example softmax cross-entropy against (optionally smoothed) integer labels."""
  targets = jax.nn.one_hot(labels, logits.shape[-1])
  if label_smoothing:
    targets = optax.smooth_labels(targets, label_smoothing)
  return optax.softmax_cross_entropy(logits.astype(jnp.float32), targets)


def topk_correct(logits: jax.Array, labels: jax.Array, k: int = 1) -> jax.Array:
  """1.0 where the label is among the k highest logits, else 0.0 (per example)."""
  if k == 1:
    return (jnp.argmax(logits, -1) == labels).astype(jnp.float32)
  label_logit = jnp.take_along_axis(logits, labels[:, None], axis=-1)
  # Ties count against the label, as top-k with an unlucky sort would.
  return (jnp.sum(logits >= label_logit, axis=-1) <= k).astype(jnp.float32)
