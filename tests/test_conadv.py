"""The train step against Algorithm 1 written out by hand, and its data dependencies."""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from conadv_jax.data import prepare
from conadv_jax.method import attacks, conadv, experiment, parallel
from configs import cpu_smoke

NUM_CLASSES = 5
BATCH = 8
LR, MOMENTUM = 0.05, 0.9


def tiny_forward(params, stats, images, *, train, branch="main"):
  """A one-hidden-layer net with one BN set per branch, in plain jnp (not library code)."""
  h = images.reshape(images.shape[0], -1) / 255.0 @ params["w1"]
  if train:
    mean, var = h.mean(0), h.var(0)
    stats = {**stats, branch: {"mean": 0.9 * stats[branch]["mean"] + 0.1 * mean,
                               "var": 0.9 * stats[branch]["var"] + 0.1 * var}}
  else:
    mean, var = stats[branch]["mean"], stats[branch]["var"]
  bn = params["bn"][branch]
  h = jax.nn.relu((h - mean) / jnp.sqrt(var + 1e-5) * bn["scale"] + bn["bias"])
  return h @ params["w2"] + params["b2"], stats


def tiny_init():
  k1, k2 = jax.random.split(jax.random.PRNGKey(42))
  bn = lambda: {"scale": jnp.ones(8), "bias": jnp.zeros(8)}
  params = {"w1": jax.random.normal(k1, (12, 8)) * 0.5, "w2": jax.random.normal(k2, (8, 5)) * 0.5,
            "b2": jnp.zeros(5), "bn": {"main": bn(), "adv": bn(), "aug": bn()}}
  stats = {b: {"mean": jnp.zeros(8), "var": jnp.ones(8)} for b in ("main", "adv", "aug")}
  return params, stats


def make_batches(n, aug=False):
  """8-bit images, as the input pipeline delivers them; with `aug` a second view of each."""
  rng = np.random.RandomState(0)
  pixels = lambda: rng.randint(0, 256, (BATCH, 2, 2, 3)).astype(np.uint8)
  return [{"image": pixels(), "label": rng.randint(0, NUM_CLASSES, BATCH).astype(np.int32),
           **({"aug_image": pixels()} if aug else {})} for _ in range(n)]


def to_8bit(adv):
  """Adversarial images as stored: rounded to whole pixel levels (integer ε keeps the ball)."""
  return jnp.round(adv).astype(jnp.uint8)


def reference_ce(logits, labels):
  logp = logits - jax.scipy.special.logsumexp(logits, axis=-1, keepdims=True)
  return -jnp.take_along_axis(logp, labels[:, None], axis=-1)[:, 0]


def reference_untargeted_pgd(params, stats, x, y, eps=6.0, step=4.0, steps=2):
  """PGD from the clean image, adversarial BN in train mode, statistics discarded."""
  x = x.astype(jnp.float32)
  adv = x
  for _ in range(steps):
    g = jax.grad(lambda z: reference_ce(tiny_forward(params, stats, z, train=True,
                                                     branch="adv")[0], y).sum())(adv)
    adv = jnp.clip(jnp.clip(adv + step * jnp.sign(g), x - eps, x + eps), 0, 255)
  return to_8bit(adv)


def reference_run(method, tau, batches, num_steps, attack, mean=False):
  """Algorithm 1 (tau >= 1), DisAdv (tau = 0) or vanilla, with plain jax.grad and SGD.

  Batches with "aug_image" add the augmented view's loss (aug BN); `mean` averages the branch
  losses instead of adding them.
  """
  params, stats = tiny_init()
  velocity = jax.tree.map(jnp.zeros_like, params)

  def loss(p, s, batch, x_adv):
    views = [(batch["image"], "main")]
    views += [(x_adv, "adv")] if x_adv is not None else []
    views += [(batch["aug_image"], "aug")] if "aug_image" in batch else []
    total = 0.0
    for x, branch in views:
      logits, s = tiny_forward(p, s, x.astype(jnp.float32), train=True, branch=branch)
      total += reference_ce(logits, batch["label"]).mean()
    return (total / len(views) if mean else total), s

  pending = {i: attack(params, stats, batches[i], i) for i in range(tau)}
  for t in range(num_steps):
    if method == "vanilla":
      x_adv = None
    elif tau == 0:
      x_adv = attack(params, stats, batches[t], t)
    else:
      x_adv = pending.pop(t)
      pending[t + tau] = attack(params, stats, batches[t + tau], t + tau)
    g, stats = jax.grad(loss, has_aux=True)(params, stats, batches[t], x_adv)
    velocity = jax.tree.map(lambda v, gi: MOMENTUM * v + gi, velocity, g)
    params = jax.tree.map(lambda p, v: p - LR * v, params, velocity)
  return params, stats


def library_run(method, tau, batches, num_steps, attack_config, mesh=None, **method_fields):
  cfg = conadv.MethodConfig(method=method, num_classes=NUM_CLASSES, staleness=tau,
                            attack=attack_config, **method_fields)
  tx = optax.sgd(LR, MOMENTUM)
  mesh = mesh or parallel.make_mesh(jax.devices()[:1])

  def init():
    params, stats = tiny_init()
    return conadv.TrainState.create(params=params, batch_stats=stats, tx=tx, staleness=tau,
                                    batch_shape=(BATCH, 2, 2, 3), rng=jax.random.PRNGKey(7))

  state = parallel.create_sharded_state(init, mesh)
  step = parallel.jit_train_step(conadv.make_train_step(tiny_forward, tx, cfg), mesh, state)
  if tau:
    fill = parallel.jit_fill_fifo(conadv.make_fill_fifo(tiny_forward, cfg), mesh, state)
    state = fill(state, tuple(batches[:tau]))
  for t in range(num_steps):
    state, _ = step(state, batches[t], batches[t + tau])
  return state


UNTARGETED = attacks.AttackConfig(epsilon=6.0, step_size=4.0, num_steps=2, random_start_prob=0.0,
                                  targeted=False)
DEFAULT = attacks.AttackConfig()  # Targeted, random start: the reference code's attack.


def library_attack_for_reference(config):
  """The library's attack function alone (not step code), keyed by (batch index, row)."""

  def attack(params, stats, batch, index):
    loss = lambda x, y: reference_ce(tiny_forward(params, stats, x, train=True, branch="adv")[0], y)
    _, root = jax.random.split(jax.random.fold_in(jax.random.PRNGKey(7), index))
    keys = jnp.stack([jax.random.fold_in(root, row) for row in range(BATCH)])
    return to_8bit(attacks.pgd_linf(loss, batch["image"], batch["label"], keys, config,
                                    NUM_CLASSES, rng_per_example=True))

  return attack


@pytest.mark.parametrize("method,tau", [("conadv", 1), ("conadv", 2), ("disadv", 0),
                                        ("vanilla", 0)])
@pytest.mark.parametrize("attack_kind", ["handwritten_untargeted", "library_default"])
def test_step_matches_reference_loop(method, tau, attack_kind):
  num_steps = 6
  batches = make_batches(num_steps + tau)
  if attack_kind == "handwritten_untargeted":
    config = UNTARGETED
    attack = lambda p, s, b, i: reference_untargeted_pgd(p, s, b["image"], b["label"])
  else:
    config = DEFAULT
    attack = library_attack_for_reference(config)
  want_params, want_stats = reference_run(method, tau, batches, num_steps, attack)
  got = library_run(method, tau, batches, num_steps, config)
  assert int(got.step) == num_steps
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6),
               got.params, want_params)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6),
               got.batch_stats, want_stats)


@pytest.mark.parametrize("method,tau", [("conadv", 2), ("disadv", 0), ("vanilla", 0)])
@pytest.mark.parametrize("weighting", ["sum", "mean"])
def test_three_branches_and_loss_weighting_match_reference_loop(method, tau, weighting):
  """The augmented view trains through its own BN; "mean" divides by the number of branches."""
  num_steps = 4
  batches = make_batches(num_steps + tau, aug=True)
  want_params, want_stats = reference_run(method, tau, batches, num_steps,
                                          library_attack_for_reference(DEFAULT),
                                          mean=weighting == "mean")
  got = library_run(method, tau, batches, num_steps, DEFAULT, aug_view=True,
                    loss_weighting=weighting)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6),
               (got.params, got.batch_stats), (want_params, want_stats))
  assert max_abs(jax.tree.map(jnp.subtract, got.batch_stats["aug"], tiny_init()[1]["aug"])) > 0


def max_abs(tree):
  return max(float(jnp.max(jnp.abs(x))) for x in jax.tree.leaves(tree))


def test_adversarial_loss_uses_the_labels_stored_with_the_fifo():
  """If batch t's labels no longer match the batch attacked τ steps ago (say, a resume on another
  host count reordered the data), task A must pair the stored images with their own labels."""
  cfg = conadv.MethodConfig(method="conadv", num_classes=NUM_CLASSES, staleness=1)
  tx = optax.sgd(LR)
  params, stats = tiny_init()
  init = lambda: conadv.TrainState.create(params=params, batch_stats=stats, tx=tx, staleness=1,
                                          batch_shape=(BATCH, 2, 2, 3), rng=jax.random.PRNGKey(0))
  attacked, later = make_batches(2)
  state = jax.jit(conadv.make_fill_fifo(tiny_forward, cfg))(init(), attacked, jnp.int32(0))
  stored = jax.device_get(state.adv_fifo)
  np.testing.assert_array_equal(stored["label"][0], attacked["label"])
  relabelled = dict(attacked, label=(attacked["label"] + 1) % NUM_CLASSES)
  _, metrics = jax.jit(conadv.make_train_step(tiny_forward, tx, cfg))(state, relabelled, later)

  def adv_loss(labels):
    logits = tiny_forward(params, stats, stored["image"][0].astype(jnp.float32), train=True,
                          branch="adv")[0]
    return float(reference_ce(logits, labels).mean())

  np.testing.assert_allclose(metrics["adv_loss"], adv_loss(attacked["label"]), rtol=1e-6)
  assert abs(adv_loss(relabelled["label"]) - adv_loss(attacked["label"])) > 1e-2
  clean_logits = tiny_forward(params, stats, attacked["image"].astype(jnp.float32), train=True)[0]
  np.testing.assert_allclose(metrics["clean_loss"],
                             reference_ce(clean_logits, relabelled["label"]).mean(), rtol=1e-6)


def test_stale_attack_differs_from_fresh_attack():
  """ConAdv τ=1 must not silently equal DisAdv: the FIFO really delays the examples."""
  batches = make_batches(7)
  conadv_state = library_run("conadv", 1, batches, 6, UNTARGETED)
  disadv_state = library_run("disadv", 0, batches, 6, UNTARGETED)
  diff = jax.tree.map(lambda a, b: float(jnp.max(jnp.abs(a - b))), conadv_state.params,
                      disadv_state.params)
  assert max(jax.tree.leaves(diff)) > 1e-4


def test_fill_fifo_changes_no_statistics_and_bounds_examples():
  cfg = conadv.MethodConfig(method="conadv", num_classes=NUM_CLASSES, staleness=2)
  tx = optax.sgd(LR)
  params, stats = tiny_init()
  state = conadv.TrainState.create(params=params, batch_stats=stats, tx=tx, staleness=2,
                                   batch_shape=(BATCH, 2, 2, 3), rng=jax.random.PRNGKey(0))
  batches = make_batches(2)
  mesh = parallel.make_mesh(jax.devices()[:1])
  stats_before = jax.device_get(stats)  # The fill donates the state.
  filled = parallel.jit_fill_fifo(conadv.make_fill_fifo(tiny_forward, cfg), mesh, state)(
      state, batches)
  jax.tree.map(np.testing.assert_array_equal, filled.batch_stats, stats_before)
  for slot in range(2):
    delta = np.abs(filled.adv_fifo["image"][slot].astype(int) - batches[slot]["image"])
    assert delta.max() <= DEFAULT.epsilon and delta.max() > 0
    np.testing.assert_array_equal(filled.adv_fifo["label"][slot], batches[slot]["label"])


# --- Independence of tasks A and B, read off the traced program. ---


def tainted_outputs(closed_jaxpr, tainted_inputs):
  """Which outputs may depend on the tainted inputs (sub-programs treated as opaque)."""
  jaxpr = closed_jaxpr.jaxpr
  tainted = {v for v, flag in zip(jaxpr.invars, tainted_inputs) if flag}
  is_var = lambda v: not hasattr(v, "val")  # Literals carry a value; variables do not.
  for eqn in jaxpr.eqns:
    if any(is_var(v) and v in tainted for v in eqn.invars):
      tainted.update(eqn.outvars)
  return [is_var(v) and v in tainted for v in jaxpr.outvars]


def dependency_map(method, tau, taint):
  """Output tree of booleans: may this output depend on the batch named by `taint`?"""
  cfg = conadv.MethodConfig(method=method, num_classes=NUM_CLASSES, staleness=tau)
  tx = optax.sgd(LR, MOMENTUM)
  params, stats = tiny_init()
  state = conadv.TrainState.create(params=params, batch_stats=stats, tx=tx, staleness=tau,
                                   batch_shape=(BATCH, 2, 2, 3), rng=jax.random.PRNGKey(0))
  batch, ahead = make_batches(2)
  step = conadv.make_train_step(tiny_forward, tx, cfg)
  closed, out_shape = jax.make_jaxpr(step, return_shape=True)(state, batch, ahead)
  flag = lambda tree, on: jax.tree.map(lambda _: on, tree)
  inputs = (flag(state, False), flag(batch, taint == "batch_t"), flag(ahead, taint == "ahead"))
  outputs = tainted_outputs(closed, jax.tree.leaves(inputs))
  return jax.tree.unflatten(jax.tree.structure(out_shape), outputs)


@pytest.mark.parametrize("tau", [1, 2])
def test_conadv_tasks_are_independent(tau):
  # Task B's result (the new FIFO) does not see batch t, hence neither its gradient nor update.
  from_batch_t = dependency_map("conadv", tau, taint="batch_t")
  new_state, metrics = from_batch_t
  assert not any(jax.tree.leaves(new_state.adv_fifo))
  trained = {k: v for k, v in new_state.params.items() if k != "bn"}
  trained["bn"] = new_state.params["bn"]["main"]  # The adv BN learns from the FIFO alone:
  assert all(jax.tree.leaves(trained)) and metrics["grad_norm"]  # the walk sees flow.
  assert not any(jax.tree.leaves(new_state.params["bn"]["adv"]))  # Stored images and labels.
  # Task A (gradient, update) does not see batch t+τ, hence not its attack.
  from_ahead = dependency_map("conadv", tau, taint="ahead")
  new_state, metrics = from_ahead
  assert not any(jax.tree.leaves(new_state.params))
  assert not metrics["grad_norm"] and not any(jax.tree.leaves(new_state.opt_state))
  assert new_state.adv_fifo["image"]


def test_disadv_gradient_depends_on_attack():
  new_state, metrics = dependency_map("disadv", 0, taint="ahead")
  # The clean branch's own BN parameters are the only ones the attack cannot reach.
  assert new_state.params["w1"] and new_state.params["bn"]["adv"]["scale"]
  assert metrics["grad_norm"]


# --- Same result on 1 and 4 devices. ---


def test_one_and_four_devices_agree():
  config = cpu_smoke.get_config("conadv")
  config.update(dict(image_size=8, batch_size=16, bn_group_size=4, optimizer="lars",
                     synthetic_num_classes=NUM_CLASSES))
  info = prepare.get_dataset_info(config)
  rng = np.random.RandomState(1)
  batches = [{"image": rng.randint(0, 256, (16, 8, 8, 3)).astype(np.uint8),
              "label": rng.randint(0, NUM_CLASSES, 16).astype(np.int32)} for _ in range(3)]

  def run(devices):
    exp = experiment.build(config, info, parallel.make_mesh(devices))
    state = exp.fill_fifo(exp.init_state(), batches[:1])
    for t in range(2):
      state, _ = exp.train_step(state, batches[t], batches[t + 1])
    assert len(state.adv_fifo["image"].sharding.device_set) == len(devices)
    return jax.device_get(state)

  assert len(jax.devices()) >= 4, "conftest.py should give 4 fake CPU devices"
  one, four = run(jax.devices()[:1]), run(jax.devices()[:4])
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5),
               (one.params, one.batch_stats, one.adv_fifo),
               (four.params, four.batch_stats, four.adv_fifo))


def test_fifo_fill_compiles_once_whatever_tau():
  """One compiled program per slot, not τ unrolled attacks."""
  cfg = conadv.MethodConfig(method="conadv", num_classes=NUM_CLASSES, staleness=5)
  tx = optax.sgd(LR)
  params, stats = tiny_init()
  mesh = parallel.make_mesh(jax.devices()[:1])
  init = lambda: conadv.TrainState.create(params=params, batch_stats=stats, tx=tx, staleness=5,
                                          batch_shape=(BATCH, 2, 2, 3), rng=jax.random.PRNGKey(0))
  state = init()
  batches = make_batches(5)
  fill = parallel.jit_fill_fifo(conadv.make_fill_fifo(tiny_forward, cfg), mesh, state)
  filled = fill(parallel.create_sharded_state(init, mesh), batches)
  assert fill.compiled_slot._cache_size() == 1
  # Batch i sits in slot i mod τ and was attacked with key i: the same as one slot at a time.
  for i in (0, 3):
    alone = conadv.make_fill_fifo(tiny_forward, cfg)(state, batches[i], jnp.int32(i))
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(a[i], b[i]), filled.adv_fifo,
                 alone.adv_fifo)
