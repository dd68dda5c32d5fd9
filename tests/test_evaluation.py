"""Evaluation scores each example once, and attacks it the same, however the split is laid out.

Layouts: device and process counts, eval_batch_size, padding.
"""
import itertools

import jax
import jax.flatten_util
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from conadv_jax.data import pipeline, prepare
from conadv_jax.method import conadv, evaluation, losses, models, parallel
from conadv_jax.run import evaluate
from configs import cpu_smoke


def make_state(params, batch_stats, batch_shape: tuple[int, ...]) -> conadv.TrainState:
  """The only place this file builds a TrainState (its signature is still moving)."""
  return conadv.TrainState.create(params=params, batch_stats=batch_stats, tx=optax.sgd(0.1),
                                  staleness=0, batch_shape=batch_shape,
                                  rng=jax.random.PRNGKey(1))


@pytest.fixture(scope="module")
def setup():
  config = cpu_smoke.get_config("conadv")
  config.eval_batch_size = 24  # 64 eval examples = 2 x 24 + 16: the last batch is padded.
  info = prepare.get_dataset_info(config)
  model = models.create_model_from_config(config, info.spec, num_devices=1)
  forward = conadv.linen_forward(model)
  variables = model.init(jax.random.PRNGKey(0), jnp.zeros((1, *info.image_shape)), train=False)
  state = make_state(variables["params"], variables["batch_stats"],
                     (config.eval_batch_size, *info.image_shape))
  cfg = conadv.MethodConfig(method="vanilla", num_classes=info.num_classes)
  return config, info, state, jax.jit(evaluation.make_eval_step(forward, cfg, False)), forward


def reference_metrics(config, state, forward):
  """Loss and top-1 over the whole eval split at once, without batching or masks."""
  info = prepare.get_dataset_info(config)
  batches = list(pipeline.eval_batches(config, info, process_index=0, process_count=1))
  images = np.concatenate([b["image"][b["mask"] > 0] for b in batches])
  labels = np.concatenate([b["label"][b["mask"] > 0] for b in batches])
  logits, _ = forward(state.params, state.batch_stats, images, train=False)
  logp = jax.nn.log_softmax(logits)
  loss = -np.take_along_axis(np.asarray(logp), labels[:, None], axis=1).mean()
  return len(labels), float(loss), float((np.argmax(logits, -1) == labels).mean())


@pytest.mark.parametrize("num_devices", [1, 3])
def test_every_example_once_on_any_device_count(setup, num_devices):
  config, info, state, eval_step, forward = setup
  mesh = parallel.make_mesh(jax.devices()[:num_devices])
  batches = pipeline.shard_and_prefetch(
      pipeline.eval_batches(config, info, process_index=0, process_count=1),
      parallel.batch_sharding(mesh))
  results = evaluation.evaluate(eval_step, jax.device_put(state, parallel.replicated(mesh)),
                                batches)
  count, loss, top1 = reference_metrics(config, state, forward)
  assert results["num_examples"] == count == info.num_eval_examples == 64
  np.testing.assert_allclose([results["loss"], results["top1"]], [loss, top1], rtol=1e-5)


def test_every_example_once_across_three_processes(setup):
  config, info, state, eval_step, forward = setup
  totals = {}
  for process in range(3):  # Each "process" evaluates its own slice; the sums add up.
    results = evaluation.evaluate(eval_step, state, pipeline.eval_batches(
        config, info, process_index=process, process_count=3))
    for key in ("loss", "top1"):
      totals[key] = totals.get(key, 0.0) + results[key] * results["num_examples"]
    totals["count"] = totals.get("count", 0) + results["num_examples"]
  count, loss, top1 = reference_metrics(config, state, forward)
  assert totals["count"] == count == 64
  np.testing.assert_allclose([totals["loss"] / count, totals["top1"] / count], [loss, top1],
                             rtol=1e-5)


# --- The eval attack is keyed per example, so adv_top1 does not depend on the batching. ---

ADV_IMAGE_SHAPE = (8, 8, 3)
NUM_ADV_EXAMPLES = 28  # Batches of 4 fit exactly; of 8 and of 12 the last one is padded.
# LLVM optimisation is most of an XLA:CPU compile; these programs run for milliseconds.
FAST_COMPILE = {"xla_backend_optimization_level": 0}


def numpy_variables(model: models.ResNet, image_shape: tuple[int, ...]):
  """(params, batch_stats): He-normal kernels, unit BN scales, zero means and biases.

  From numpy because model.init compiles a random kernel per parameter shape (~10 s here).
  """
  shapes = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), jnp.zeros((1, *image_shape)),
                                             train=False))
  rng = np.random.RandomState(0)

  def value(path, leaf):
    if path[-1].key == "kernel":
      return rng.normal(0, np.sqrt(2 / np.prod(leaf.shape[:-1])), leaf.shape).astype(np.float32)
    return np.full(leaf.shape, 1.0 if path[-1].key in ("scale", "var") else 0.0, np.float32)

  variables = jax.tree_util.tree_map_with_path(value, shapes)
  return variables["params"], variables["batch_stats"]


@pytest.fixture(scope="module")
def adversarial_eval():
  """(state, eval_step, attack) under the training attack: random starts, random targets."""
  model = models.create_model("SmallResNet", num_classes=10, pixel_mean=(127.5,),
                              pixel_std=(73.6,), small_resnet_depth=8, small_resnet_width=4)
  forward = conadv.linen_forward(model)
  cfg = conadv.MethodConfig(method="vanilla", num_classes=10)  # Default AttackConfig.
  assert cfg.attack.targeted and 0 < cfg.attack.random_start_prob < 1
  state = make_state(*numpy_variables(model, ADV_IMAGE_SHAPE), (4, *ADV_IMAGE_SHAPE))
  eval_step = jax.jit(evaluation.make_eval_step(forward, cfg, adversarial=True),
                      compiler_options=FAST_COMPILE)
  attack = jax.jit(evaluation.make_eval_attack(forward, cfg), compiler_options=FAST_COMPILE)
  return state, eval_step, attack


def eval_split() -> tuple[np.ndarray, np.ndarray]:
  rng = np.random.RandomState(0)
  return (rng.uniform(0, 255, (NUM_ADV_EXAMPLES, *ADV_IMAGE_SHAPE)).astype(np.float32),
          rng.randint(0, 10, NUM_ADV_EXAMPLES).astype(np.int32))


def padded_batches(images, labels, batch_size: int, *, indices: np.ndarray | None = None,
                   junk_padding: bool = False) -> list[dict[str, np.ndarray]]:
  """The examples in order, cut as eval_batches cuts one process's split: the last batch padded.

  Padding rows have mask 0. `indices` adds each row's 'index' (-1 on padding); `junk_padding`
  pads with noise images and random labels instead of zeros.
  """
  rng = np.random.RandomState(1)
  batches = []
  for start in range(0, len(labels), batch_size):
    image, label = images[start:start + batch_size], labels[start:start + batch_size]
    num_pad = batch_size - len(label)
    pad_image = np.zeros((num_pad, *image.shape[1:]), np.float32)
    pad_label = np.zeros(num_pad, np.int32)
    if junk_padding:
      pad_image = rng.uniform(0, 255, pad_image.shape).astype(np.float32)
      pad_label = rng.randint(0, 10, num_pad).astype(np.int32)
    batch = {"image": np.concatenate([image, pad_image]),
             "label": np.concatenate([label, pad_label]),
             "mask": np.concatenate([np.ones(len(label)), np.zeros(num_pad)]).astype(np.float32)}
    if indices is not None:
      batch["index"] = np.concatenate([indices[start:start + batch_size],
                                       np.full(num_pad, -1)]).astype(np.int32)
    batches.append(batch)
  return batches


def real_rows_adversarial(attack, state, batches) -> np.ndarray:
  """Adversarial images of the unpadded rows, in batch order."""
  rows = [np.asarray(attack(state, batch, jnp.int32(i)))[np.asarray(batch["mask"]) > 0]
          for i, batch in enumerate(batches)]
  return np.concatenate(rows)


def eval_on_layouts(eval_step, attack, state, batch_sizes: tuple[int, ...]):
  """(metrics, adversarial rows) per layout: each batch size on one device, then 12 on 4."""
  images, labels = eval_split()
  results, adversarial = {}, {}
  for size in batch_sizes:
    batches = padded_batches(images, labels, size)
    results[size] = evaluation.evaluate(eval_step, state, batches)
    adversarial[size] = real_rows_adversarial(attack, state, batches)
  mesh = parallel.make_mesh(jax.devices()[:4])
  sharded = [jax.device_put(b, parallel.batch_sharding(mesh))
             for b in padded_batches(images, labels, 12)]
  replicated_state = jax.device_put(state, parallel.replicated(mesh))
  results["12 on 4 devices"] = evaluation.evaluate(eval_step, replicated_state, sharded)
  adversarial["12 on 4 devices"] = real_rows_adversarial(attack, replicated_state, sharded)
  return results, adversarial


def test_adversarial_eval_does_not_depend_on_eval_batch_size(adversarial_eval):
  state, eval_step, attack = adversarial_eval
  images, _ = eval_split()
  results, adversarial = eval_on_layouts(eval_step, attack, state, (4, 8, 12))

  # The attack really moved (nearly) every example, within its budget.
  moved = np.any(adversarial[4] != images, axis=(1, 2, 3))
  assert moved.mean() > 0.9 and np.abs(adversarial[4] - images).max() <= 9.0 + 1e-4
  for layout in (8, 12, "12 on 4 devices"):
    np.testing.assert_array_equal(adversarial[layout], adversarial[4], err_msg=str(layout))
    assert results[layout]["num_examples"] == NUM_ADV_EXAMPLES
    assert results[layout]["adv_top1"] == results[4]["adv_top1"], layout


def test_eval_attack_depends_on_the_example_index_only(adversarial_eval):
  """With 'index' in the batch, an example shuffled elsewhere or alone gets the same attack."""
  state, _, attack = adversarial_eval
  images, labels = eval_split()
  in_order = real_rows_adversarial(attack, state, padded_batches(images, labels, 8))
  order = np.random.RandomState(2).permutation(NUM_ADV_EXAMPLES)
  shuffled = real_rows_adversarial(
      attack, state, padded_batches(images[order], labels[order], 8, indices=order))
  np.testing.assert_array_equal(shuffled, in_order[order])
  for i in (0, 13, NUM_ADV_EXAMPLES - 1):
    alone = padded_batches(images[i:i + 1], labels[i:i + 1], 1, indices=np.array([i]))[0]
    np.testing.assert_array_equal(np.asarray(attack(state, alone, jnp.int32(0)))[0], in_order[i])
  # And the key is the state's: another root key gives other random starts and targets.
  other = state.replace(rng=jax.random.PRNGKey(2))
  other_adversarial = real_rows_adversarial(attack, other, padded_batches(images, labels, 8))
  assert np.mean(np.any(other_adversarial != in_order, axis=(1, 2, 3))) > 0.5


def test_padding_rows_change_nothing(adversarial_eval):
  state, eval_step, attack = adversarial_eval
  images, labels = eval_split()
  zero_padded = padded_batches(images, labels, 12)
  junk_padded = padded_batches(images, labels, 12, junk_padding=True)
  noise = np.random.RandomState(3).uniform(0, 255, (12, *ADV_IMAGE_SHAPE)).astype(np.float32)
  junk_padded.append({"image": noise, "label": np.arange(12, dtype=np.int32) % 10,
                      "mask": np.zeros(12, np.float32)})  # And a fully padded batch.
  assert zero_padded[-1]["mask"].sum() == 4  # The split does end in padding.
  assert (evaluation.evaluate(eval_step, state, junk_padded) ==
          evaluation.evaluate(eval_step, state, zero_padded))
  np.testing.assert_array_equal(real_rows_adversarial(attack, state, junk_padded),
                                real_rows_adversarial(attack, state, zero_padded))


# --- robust_top1: untargeted PGD at the final parameters. ---

LINEAR_SHAPE = (4, 4, 1)


def linear_forward(params, batch_stats, images, *, train: bool, branch: str = "main"):
  """Two classes, logits (0, w·x + b): the worst case in an L∞ ball is known in closed form."""
  del train, branch
  score = images.reshape(images.shape[0], -1).astype(jnp.float32) @ params["w"] + params["b"]
  return jnp.stack([jnp.zeros_like(score), score], axis=-1), batch_stats


def robust_eval(forward, state, batches, epsilon: float, num_steps: int = 10, num_classes=2):
  pgd = evaluation.robust_attack_config(epsilon, num_steps)
  step = jax.jit(evaluation.make_robust_eval_step(forward, num_classes, pgd),
                 compiler_options=FAST_COMPILE)
  return evaluation.evaluate(step, state, batches)


def linear_case(seed: int = 0, num: int = 80):
  """(state, batches, w, signed margins): labels and margins known exactly in numpy."""
  rng = np.random.RandomState(seed)
  dim = int(np.prod(LINEAR_SHAPE))
  w = rng.choice([-1.0, 1.0], dim) * rng.uniform(0.01, 0.03, dim)
  # Images near mid-grey: 128 + a·sign(w) + noise, so w·x − 128·Σw = a·‖w‖₁ + w·noise, and a
  # ball of ε <= 20 around them stays inside [0, 255].
  a = rng.uniform(-30, 30, num)
  images = 128 + a[:, None] * np.sign(w) + rng.uniform(-10, 10, (num, dim))
  score = images @ w - 128 * w.sum()
  labels = rng.randint(0, 2, num)
  margins = np.where(labels == 1, score, -score)  # > 0: correct.
  params = {"w": jnp.asarray(w, jnp.float32), "b": jnp.float32(-128 * w.sum())}
  state = make_state(params, {}, (8, *LINEAR_SHAPE))
  batches = padded_batches(images.reshape(num, *LINEAR_SHAPE).astype(np.float32),
                           labels.astype(np.int32), 8)
  return state, batches, w, margins


def test_pgd_reaches_the_linear_model_s_worst_case_so_robust_is_at_most_clean():
  """For two classes and logits (0, w·x + b), the smallest margin within ε is margin − ε‖w‖₁
  (pixels stay inside [0, 255] here), so robust top-1 is known exactly and PGD must find it."""
  state, batches, w, margins = linear_case()
  l1 = np.abs(w).sum()
  clean = evaluation.evaluate(jax.jit(evaluation.make_eval_step(
      linear_forward, conadv.MethodConfig(method="vanilla", num_classes=2), False)),
      state, batches)["top1"]
  assert clean == pytest.approx(np.mean(margins > 0))
  previous = clean
  for epsilon in (0.0, 2.0, 5.0, 10.0):
    worst = margins - epsilon * l1
    assert np.min(np.abs(worst)) > 1e-3, "a margin sits on the threshold; change the seed"
    robust = robust_eval(linear_forward, state, batches, epsilon)["robust_top1"]
    assert robust == pytest.approx(np.mean(worst > 0)), epsilon
    assert robust <= previous <= clean
    previous = robust
  # The attack did bite: at ε = 10 the examples with margins below 10·‖w‖₁ fell.
  assert previous < clean - 0.1


def test_a_model_without_input_gradient_is_unaffected():
  """PGD follows the input gradient; with none, only the random start moves the images."""
  images, labels = eval_split()
  batches = padded_batches(images, labels, 8)

  def constant(params, batch_stats, x, *, train, branch="main"):
    del train, branch  # Ignores its input: the same logits for every image.
    return jnp.broadcast_to(params["logits"], (x.shape[0], 10)), batch_stats

  def coarse(params, batch_stats, x, *, train, branch="main"):
    """Class = brightness bin of 25.5 levels; no gradient flows back to the pixels."""
    del params, train, branch
    bins = jnp.floor(jax.lax.stop_gradient(x).mean(axis=(1, 2, 3)) / 25.5).astype(jnp.int32)
    return jax.nn.one_hot(jnp.clip(bins, 0, 9), 10), batch_stats

  logits = jnp.arange(10.0).at[3].set(20.0)  # Always class 3.
  state = make_state({"logits": logits}, {}, (8, *ADV_IMAGE_SHAPE))
  robust = robust_eval(constant, state, batches, 8.0, num_classes=10)["robust_top1"]
  assert robust == np.mean(labels == 3) > 0
  # Bin centres: the mean of noise within ±8 per pixel cannot leave a bin 25.5 wide.
  flat = np.repeat(((labels + 0.5) * 25.5)[:, None], np.prod(ADV_IMAGE_SHAPE), axis=1)
  centred = padded_batches(flat.reshape(-1, *ADV_IMAGE_SHAPE).astype(np.float32), labels, 8)
  assert robust_eval(coarse, state, centred, 8.0, num_classes=10)["robust_top1"] == 1.0


def test_robust_eval_does_not_depend_on_eval_batch_size(adversarial_eval):
  state, _, _ = adversarial_eval
  model = models.create_model("SmallResNet", num_classes=10, pixel_mean=(127.5,),
                              pixel_std=(73.6,), small_resnet_depth=8, small_resnet_width=4)
  forward = conadv.linen_forward(model)
  pgd = evaluation.robust_attack_config(8.0, 3)
  assert pgd.step_size == pytest.approx(2.5 * 8.0 / 3) and not pgd.targeted
  step = jax.jit(evaluation.make_robust_eval_step(forward, 10, pgd),
                 compiler_options=FAST_COMPILE)
  attack = jax.jit(evaluation.make_robust_attack(forward, 10, pgd),
                   compiler_options=FAST_COMPILE)
  images, labels = eval_split()
  robust, adversarial = eval_on_layouts(step, attack, state, (4, 12))
  delta = np.abs(adversarial[4] - images)
  assert delta.max() <= 8.0 + 1e-4 and np.mean(delta > 0) > 0.9  # Moved, within the ball.
  for layout in (12, "12 on 4 devices"):
    np.testing.assert_array_equal(adversarial[layout], adversarial[4], err_msg=str(layout))
    assert robust[layout] == robust[4], layout
  # Its own key stream: not the training attack's random starts.
  _, _, train_attack = adversarial_eval
  assert not np.array_equal(real_rows_adversarial(train_attack, state,
                                                  padded_batches(images, labels, 4)),
                            adversarial[4])


# --- The fixed training subset of final-parameter measurements (sharpness). ---


def _rows(images: np.ndarray) -> list[bytes]:
  return [np.asarray(row, np.float32).tobytes() for row in images]


def test_train_subset_is_the_first_training_examples_whatever_the_batching():
  config = cpu_smoke.get_config("conadv")  # 256 synthetic train examples, 64 eval ones.
  info = prepare.get_dataset_info(config)
  subset = evaluate.train_subset(config, info, 40)
  assert subset["image"].shape == (40, *info.image_shape) and subset["label"].shape == (40,)
  # Training examples (all 256 are in the first epoch's 8 batches), none of the eval split.
  epoch = list(itertools.islice(pipeline.train_batches(config, info, process_index=0,
                                                             process_count=1), 8))
  train_rows = set(_rows(np.concatenate([b["image"] for b in epoch])))
  eval_rows = set(_rows(np.concatenate(
      [b["image"][b["mask"] > 0] for b in pipeline.eval_batches(
          config, info, process_index=0, process_count=1)])))
  assert set(_rows(subset["image"])) <= train_rows
  assert not set(_rows(subset["image"])) & eval_rows
  # Fixed: the same for another eval batch size, and a prefix of a larger subset.
  other = ml_collections.ConfigDict(config.to_dict())
  other.eval_batch_size = 7
  for again in (evaluate.train_subset(other, info, 40),
                {k: v[:40] for k, v in evaluate.train_subset(config, info, 100).items()}):
    np.testing.assert_array_equal(again["image"], subset["image"])
    np.testing.assert_array_equal(again["label"], subset["label"])
  with pytest.raises(ValueError, match="has 256"):
    evaluate.train_subset(config, info, 257)


def test_final_sharpness_is_the_top_eigenvalue_of_the_exact_hessian():
  """A tiny MLP whose Hessian is formed exactly: the recorded number is its largest eigenvalue
  (in magnitude) for the training loss on the fixed subset, main BN in inference mode."""
  config = cpu_smoke.get_config("vanilla")
  config.update(dict(model="MLP", mlp_widths=(3,), image_size=3, sharpness_num_examples=48,
                     sharpness_iterations=300, eval_batch_size=20, label_smoothing=0.1))
  info = prepare.get_dataset_info(config)
  model = models.create_model_from_config(config, info.spec, num_devices=1)
  forward = conadv.linen_forward(model)
  variables = model.init(jax.random.PRNGKey(3), jnp.zeros((1, *info.image_shape)), train=False)
  # Running averages away from their init, so that inference-mode BN is not the identity.
  batch_stats = jax.tree.map(lambda x: x + 0.3, variables["batch_stats"])
  state = make_state(variables["params"], batch_stats, (8, *info.image_shape))
  mesh = parallel.make_mesh(jax.devices()[:1])
  result = evaluate.final_sharpness(config, info, mesh, forward, state)

  subset = evaluate.train_subset(config, info, 48)
  flat, unravel = jax.flatten_util.ravel_pytree(variables["params"])

  def loss(vector):
    logits, _ = forward(unravel(vector), batch_stats, jnp.asarray(subset["image"], jnp.float32),
                        train=False)
    return losses.cross_entropy(logits, subset["label"], 0.1).mean()

  eigenvalues = np.linalg.eigvalsh(np.asarray(jax.hessian(loss)(flat), np.float64))
  top = eigenvalues[np.argmax(np.abs(eigenvalues))]
  assert flat.size < 200 and abs(top) > 1e-3
  assert result["top_hessian_eigenvalue"] == pytest.approx(top, rel=2e-3)
  assert result["num_examples"] == 48 and 1 <= result["iterations"] <= 300
  config.sharpness_num_examples = 0
  assert evaluate.final_sharpness(config, info, mesh, forward, state) is None
