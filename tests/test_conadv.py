"""The train step against Algorithm 1 written out by hand, and its data dependencies."""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from conadv_jax import attacks, conadv, experiment, input_pipeline, parallel
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
            "b2": jnp.zeros(5), "bn": {"main": bn(), "adv": bn()}}
  stats = {b: {"mean": jnp.zeros(8), "var": jnp.ones(8)} for b in ("main", "adv")}
  return params, stats


def make_batches(n):
  rng = np.random.RandomState(0)
  return [{"image": rng.uniform(0, 255, (BATCH, 2, 2, 3)).astype(np.float32),
           "label": rng.randint(0, NUM_CLASSES, BATCH).astype(np.int32)} for _ in range(n)]


def reference_ce(logits, labels):
  logp = logits - jax.scipy.special.logsumexp(logits, axis=-1, keepdims=True)
  return -jnp.take_along_axis(logp, labels[:, None], axis=-1)[:, 0]


def reference_untargeted_pgd(params, stats, x, y, eps=6.0, step=4.0, steps=2):
  """PGD from the clean image, adversarial BN in train mode, statistics discarded."""
  adv = x
  for _ in range(steps):
    g = jax.grad(lambda z: reference_ce(tiny_forward(params, stats, z, train=True,
                                                     branch="adv")[0], y).sum())(adv)
    adv = jnp.clip(jnp.clip(adv + step * jnp.sign(g), x - eps, x + eps), 0, 255)
  return adv


def reference_run(method, tau, batches, num_steps, attack):
  """Algorithm 1 (tau >= 1), DisAdv (tau = 0) or vanilla, with plain jax.grad and SGD."""
  params, stats = tiny_init()
  velocity = jax.tree.map(jnp.zeros_like, params)

  def loss(p, s, x, y, x_adv):
    logits, s = tiny_forward(p, s, x, train=True, branch="main")
    total = reference_ce(logits, y).mean()
    if x_adv is not None:
      adv_logits, s = tiny_forward(p, s, x_adv, train=True, branch="adv")
      total += reference_ce(adv_logits, y).mean()
    return total, s

  pending = {i: attack(params, stats, batches[i], i) for i in range(tau)}
  for t in range(num_steps):
    x, y = batches[t]["image"], batches[t]["label"]
    if method == "vanilla":
      x_adv = None
    elif tau == 0:
      x_adv = attack(params, stats, batches[t], t)
    else:
      x_adv = pending.pop(t)
      pending[t + tau] = attack(params, stats, batches[t + tau], t + tau)
    g, stats = jax.grad(loss, has_aux=True)(params, stats, x, y, x_adv)
    velocity = jax.tree.map(lambda v, gi: MOMENTUM * v + gi, velocity, g)
    params = jax.tree.map(lambda p, v: p - LR * v, params, velocity)
  return params, stats


def library_run(method, tau, batches, num_steps, attack_config, mesh=None):
  cfg = conadv.MethodConfig(method=method, num_classes=NUM_CLASSES, staleness=tau,
                            attack=attack_config)
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
  """The library's attack function alone (not step code), keyed by batch index."""

  def attack(params, stats, batch, index):
    loss = lambda x, y: reference_ce(tiny_forward(params, stats, x, train=True, branch="adv")[0], y)
    return attacks.pgd_linf(loss, batch["image"], batch["label"],
                            jax.random.fold_in(jax.random.PRNGKey(7), index), config, NUM_CLASSES)

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
    delta = np.abs(np.asarray(filled.adv_fifo[slot]) - batches[slot]["image"])
    assert delta.max() <= DEFAULT.epsilon + 1e-4 and delta.max() > 0


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
  assert not new_state.adv_fifo
  assert all(jax.tree.leaves(new_state.params)) and metrics["grad_norm"]  # The walk sees flow.
  # Task A (gradient, update) does not see batch t+τ, hence not its attack.
  from_ahead = dependency_map("conadv", tau, taint="ahead")
  new_state, metrics = from_ahead
  assert not any(jax.tree.leaves(new_state.params))
  assert not metrics["grad_norm"] and not any(jax.tree.leaves(new_state.opt_state))
  assert new_state.adv_fifo


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
  info = input_pipeline.get_dataset_info(config)
  rng = np.random.RandomState(1)
  batches = [{"image": rng.uniform(0, 255, (16, 8, 8, 3)).astype(np.float32),
              "label": rng.randint(0, NUM_CLASSES, 16).astype(np.int32)} for _ in range(3)]

  def run(devices):
    exp = experiment.build(config, info, parallel.make_mesh(devices))
    state = exp.fill_fifo(exp.init_state(), batches[:1])
    for t in range(2):
      state, _ = exp.train_step(state, batches[t], batches[t + 1])
    assert len(state.adv_fifo.sharding.device_set) == len(devices)
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
    np.testing.assert_array_equal(filled.adv_fifo[i], alone.adv_fifo[i])
