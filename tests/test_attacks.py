"""Properties of the L∞ PGD attack."""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from conadv_jax.data import prepare
from conadv_jax.method import attacks, conadv, experiment, losses, models, parallel
from configs import cpu_smoke

NUM_CLASSES = 4


def linear_loss_fn(w):
  """Per-example CE of a linear classifier on flattened, scaled pixels."""
  return lambda x, y: losses.cross_entropy((x.reshape(x.shape[0], -1) / 255.0) @ w, y)


def batch(n=64, seed=0):
  rng = np.random.RandomState(seed)
  images = rng.uniform(0, 255, (n, 3, 3, 1)).astype(np.float32)
  images[: n // 4] = 0.0  # Saturated pixels exercise the [0, 255] clip.
  images[n // 4: n // 2] = 255.0
  return jnp.asarray(images), jnp.asarray(rng.randint(0, NUM_CLASSES, n), jnp.int32)


@pytest.mark.parametrize("config", [
    attacks.AttackConfig(),
    attacks.AttackConfig(epsilon=4.0, step_size=3.0, num_steps=5, random_start_prob=1.0),
    attacks.AttackConfig(epsilon=8.0, step_size=20.0, num_steps=3, targeted=False),
])
def test_stays_in_epsilon_ball_and_pixel_range(config):
  images, labels = batch()
  w = jax.random.normal(jax.random.PRNGKey(0), (9, NUM_CLASSES)) * 10
  adv = jax.jit(attacks.pgd_linf, static_argnums=(0, 4, 5))(
      linear_loss_fn(w), images, labels, jax.random.PRNGKey(1), config, NUM_CLASSES)
  assert float(jnp.max(jnp.abs(adv - images))) <= config.epsilon + 1e-4
  assert float(adv.min()) >= 0.0 and float(adv.max()) <= 255.0
  assert float(jnp.max(jnp.abs(adv - images))) > 0.5 * config.epsilon  # It did move.


def test_random_wrong_labels_never_hit_the_true_label_and_cover_the_rest():
  labels = jnp.asarray(np.arange(10_000) % NUM_CLASSES, jnp.int32)
  targets = np.asarray(attacks.random_wrong_labels(jax.random.PRNGKey(0), labels, NUM_CLASSES))
  assert not np.any(targets == np.asarray(labels))
  for c in range(NUM_CLASSES):
    seen = set(targets[np.asarray(labels) == c])
    assert seen == set(range(NUM_CLASSES)) - {c}


def test_targeted_attack_moves_towards_its_target():
  images, labels = batch(seed=3)
  w = jax.random.normal(jax.random.PRNGKey(2), (9, NUM_CLASSES)) * 10
  config = attacks.AttackConfig(epsilon=30.0, step_size=10.0, num_steps=3, random_start_prob=0.0)
  rng = jax.random.PRNGKey(4)
  adv = attacks.pgd_linf(linear_loss_fn(w), images, labels, rng, config, NUM_CLASSES)
  # The attack derives its targets from the second half of its key, as documented in pgd_linf.
  targets = attacks.random_wrong_labels(jax.random.split(rng)[1], labels, NUM_CLASSES)
  loss = linear_loss_fn(w)
  assert float(loss(adv, targets).mean()) < float(loss(images, targets).mean())


def test_untargeted_one_step_raises_the_loss_of_a_trained_model():
  model = models.create_model("SmallResNet", num_classes=NUM_CLASSES, pixel_mean=(127.5,),
                              pixel_std=(73.6,), small_resnet_depth=8, small_resnet_width=8)
  forward = conadv.linen_forward(model)
  rng = np.random.RandomState(0)
  labels = rng.randint(0, NUM_CLASSES, 64).astype(np.int32)
  # Learnable data: the class sets the brightness of one quadrant.
  images = rng.uniform(0, 100, (64, 8, 8, 3)).astype(np.float32)
  for i, c in enumerate(labels):
    images[i, (c // 2) * 4:(c // 2) * 4 + 4, (c % 2) * 4:(c % 2) * 4 + 4] += 150
  cfg = conadv.MethodConfig(method="vanilla", num_classes=NUM_CLASSES)
  tx = optax.adam(1e-2)
  v = model.init(jax.random.PRNGKey(0), images[:1], train=False)
  state = conadv.TrainState.create(params=v["params"], batch_stats=v["batch_stats"], tx=tx,
                                   staleness=0, batch_shape=images.shape,
                                   rng=jax.random.PRNGKey(0))
  step = jax.jit(conadv.make_train_step(forward, tx, cfg))
  batch_ = {"image": images, "label": labels}
  for _ in range(30):
    state, metrics = step(state, batch_, batch_)
  assert float(metrics["clean_top1"]) > 0.9

  def eval_loss(x):
    logits, _ = forward(state.params, state.batch_stats, x, train=False)
    return losses.cross_entropy(logits, jnp.asarray(labels))

  config = attacks.AttackConfig(epsilon=16.0, step_size=16.0, num_steps=1, random_start_prob=0.0,
                                targeted=False)
  adv = attacks.pgd_linf(lambda x, y: eval_loss(x), jnp.asarray(images), jnp.asarray(labels),
                         jax.random.PRNGKey(0), config, NUM_CLASSES)
  noise = 16.0 * jnp.sign(jax.random.normal(jax.random.PRNGKey(5), images.shape))
  noisy = jnp.clip(images + noise, 0, 255)
  clean_loss, noisy_loss, adv_loss = (float(eval_loss(x).mean()) for x in (images, noisy, adv))
  # Same L∞ size as random sign noise, but aimed: far more damaging.
  assert adv_loss > 10 * clean_loss and adv_loss > 5 * noisy_loss


def test_attack_does_not_update_running_averages():
  model = models.create_model("SmallResNet", num_classes=NUM_CLASSES, pixel_mean=(127.5,),
                              pixel_std=(73.6,), small_resnet_depth=8, small_resnet_width=4)
  forward = conadv.linen_forward(model)
  images = np.random.RandomState(0).uniform(0, 255, (8, 8, 8, 3)).astype(np.float32)
  v = model.init(jax.random.PRNGKey(0), images, train=False)
  cfg = conadv.MethodConfig(method="conadv", num_classes=NUM_CLASSES, staleness=1)
  attack = conadv.make_attack_fn(forward, cfg)
  closed = jax.make_jaxpr(attack)(v["params"], v["batch_stats"], jax.random.PRNGKey(0),
                                  {"image": images, "label": np.zeros(8, np.int32)}, 0,
                                  np.arange(8))
  # The attack returns images and their labels only: BN statistics cannot leave it.
  assert [o.aval.shape for o in closed.jaxpr.outvars] == [images.shape, (8,)]


@pytest.mark.parametrize("epsilon", [0.0, 3.6, 4.0, 9.0])
def test_quantize_rounds_to_8bit_pixels_inside_the_ball(epsilon):
  rng = np.random.RandomState(0)
  images = rng.randint(0, 256, (256, 4)).astype(np.uint8)
  images[:8] = 0
  images[8:16] = 255
  clean = images.astype(np.float64)
  # Anything within the ball and the pixel range, fractional, including the exact bounds.
  low, high = np.maximum(clean - epsilon, 0), np.minimum(clean + epsilon, 255)
  adversarial = low + (high - low) * rng.uniform(0, 1, images.shape)
  adversarial[:, 0], adversarial[:, 1] = low[:, 0], high[:, 1]
  got = np.asarray(attacks.quantize(jnp.asarray(adversarial, jnp.float32), images, epsilon))
  assert got.dtype == np.uint8
  delta = np.abs(got.astype(np.float64) - clean)
  assert delta.max() <= epsilon
  # Nearest whole level, except where that would leave the ball (ε = 3.6: 3.6 rounds to 4).
  nearest = np.round(adversarial)
  inside = np.abs(nearest - clean) <= epsilon
  np.testing.assert_array_equal(got[inside], nearest[inside])
  np.testing.assert_array_equal(np.abs(got[~inside].astype(float) - nearest[~inside]), 1)
  assert (~inside).any() == (epsilon == 3.6)


def test_per_batch_random_start_shares_one_coin():
  """per_batch: all examples of a batch start from noise, or none do; about 80% of batches do."""
  n, batches, center, eps = 16, 400, 127.0, 9.0
  images = jnp.full((n, 2, 2, 1), center)
  labels = jnp.zeros((n,), jnp.int32)
  config = attacks.AttackConfig(epsilon=eps, step_size=eps, random_start="per_batch")
  flat_loss = lambda x, y: 0.0 * jnp.sum(x, axis=(1, 2, 3))  # sign(0) = 0: stays at its start.
  attack = jax.jit(jax.vmap(lambda key: attacks.pgd_linf(flat_loss, images, labels, key, config,
                                                         NUM_CLASSES)))
  moved = np.any(np.asarray(attack(jax.random.split(jax.random.PRNGKey(0), batches))) != center,
                 axis=(2, 3, 4))
  assert np.all(moved.all(axis=1) | ~moved.any(axis=1))  # One coin per batch.
  assert abs(moved[:, 0].mean() - 0.8) <= 5 * np.sqrt(0.8 * 0.2 / batches)


def _fifo_attacks_of_the_train_step(random_start: str, num_steps: int):
  """Attacks the real ConAdv step (τ = 1, 4 devices, grad_accum_steps = 2) writes to its FIFO.

  The model's parameters are all zero and the learning rate is 0, so its input gradient is
  exactly zero at every step: sign(0) = 0 and each adversarial image is its random start,
  quantized. A row equal to the clean image started clean; any other row started from noise.
  Returns (moved [num_steps + 1, B] bool, clean images, FIFO images [num_steps + 1, B, ...]).
  """
  config = cpu_smoke.get_config("conadv")
  config.update(dict(image_size=8, batch_size=16, bn_group_size=2, grad_accum_steps=2,
                     synthetic_num_classes=5, learning_rate=0.0))
  config.attack.random_start = random_start
  exp = experiment.build(config, prepare.get_dataset_info(config),
                         parallel.make_mesh(jax.devices()[:4]))
  assert exp.method.staleness == 1 and exp.method.grad_accum_steps == 2
  rng = np.random.RandomState(0)
  batch = {"image": rng.randint(20, 236, (16, 8, 8, 3)).astype(np.uint8),
           "label": rng.randint(0, 5, 16).astype(np.int32)}
  state = exp.init_state()
  state = state.replace(params=jax.tree.map(lambda p: p * 0, state.params))
  # The coin of batch i comes from (rng, i) alone, so one batch serves every step; the FIFO
  # slot after step t holds the attack on batch t + 1.
  state = exp.fill_fifo(state, [batch])
  slots = [np.asarray(state.adv_fifo["image"][0])]
  for _ in range(num_steps):
    state, _ = exp.train_step(state, batch, batch)
    slots.append(np.asarray(state.adv_fifo["image"][0]))
  assert not any(np.any(np.asarray(p)) for p in jax.tree.leaves(state.params))  # Still zero.
  slots = np.stack(slots)
  moved = np.any(slots != batch["image"], axis=(2, 3, 4))
  return moved, batch["image"], slots


def test_per_batch_random_start_in_the_train_step_shares_one_coin_per_batch():
  """Through fill_fifo and the jitted step on 4 devices with 2 micro-batches, random_start=
  "per_batch" starts every row of a batch from noise or none of them, for ~80% of batches.

  A coin per example, per micro-batch or per device would leave some batches mixed.
  """
  moved, clean, slots = _fifo_attacks_of_the_train_step("per_batch", num_steps=150)
  batches = moved.shape[0]
  assert np.all(moved.all(axis=1) | ~moved.any(axis=1)), np.flatnonzero(
      moved.any(axis=1) & ~moved.all(axis=1))
  fraction = moved[:, 0].mean()
  assert abs(fraction - 0.8) <= 5 * np.sqrt(0.8 * 0.2 / batches), fraction
  assert np.abs(slots.astype(int) - clean.astype(int)).max() <= 9  # Inside the ε-ball.


def test_per_example_random_start_in_the_train_step_mixes_a_batch():
  """The same path with random_start="per_example": each row has its own coin."""
  moved, _, _ = _fifo_attacks_of_the_train_step("per_example", num_steps=15)
  mixed = moved.any(axis=1) & ~moved.all(axis=1)
  assert mixed.mean() >= 0.5, mixed  # P(16 rows agree) = 0.8^16 + 0.2^16 ≈ 3%.
  assert abs(moved.mean() - 0.8) <= 5 * np.sqrt(0.8 * 0.2 / moved.size), moved.mean()
