"""Every config file and preset loads, passes validation and builds its model; config files are
plain data (no import of the library) with a short docstring; the ImageNet recipe table."""
import ast
import dataclasses
import functools
import importlib
import inspect
import itertools
import math
import pathlib
import re

import jax
import jax.numpy as jnp
import ml_collections
import pytest

from conadv_jax.data import datasets, input_config, pipeline, prepare
from conadv_jax.method import attacks, conadv, experiment, models, optim, parallel
from conadv_jax.run import config_history, config_validation
from configs import common, fashion_mnist_study, imagenet_resnet50

METHOD_PRESETS = ["vanilla", "disadv", "conadv", "conadv2"]
CASES = ([("default", None)] + [(f, p) for f in ("fashion_mnist", "cpu_smoke", "cifar10")
                                for p in METHOD_PRESETS] +
         [("imagenet_resnet50", f"{m}_{b}") for m in common.METHOD_PRESETS
          for b in imagenet_resnet50.BATCH_SIZES] +
         [("imagenet_resnet50", f"{m}_aa_{b}") for m in ("conadv", "vanilla")
          for b in imagenet_resnet50.BATCH_SIZES] +
         [("cpu_smoke", "conadv_aa")] +
         [("fashion_mnist_study", f"{m}_{b}") for m in common.METHOD_PRESETS
          for b in fashion_mnist_study.BATCH_SIZES])
IMAGE_SHAPES = {"fashion_mnist": (28, 28, 1), "cifar10": (32, 32, 3),
                "imagenet2012": (224, 224, 3)}
NUM_CLASSES = {"fashion_mnist": 10, "cifar10": 10, "imagenet2012": 1000}


def _num_devices(name: str) -> int:
  """The study's presets are for one CPU device (BN groups of 256 in batches from 256 up)."""
  return 1 if name == "fashion_mnist_study" else 4


def load(name, preset):
  module = importlib.import_module(f"configs.{name}")
  return module.get_config(preset) if preset else module.get_config()


@pytest.mark.parametrize("name,preset", CASES)
def test_config_validates_and_builds_its_model(name, preset):
  config = load(name, preset)
  config_validation.validate(config, num_devices=_num_devices(name))
  image_shape = (IMAGE_SHAPES.get(config.dataset)
                 or (config.image_size or 32, config.image_size or 32, 3))
  num_classes = NUM_CLASSES.get(config.dataset, config.synthetic_num_classes)
  model = models.create_model_from_config(config, datasets.get_spec(config), num_devices=_num_devices(name))
  variables = jax.eval_shape(lambda: model.init(
      jax.random.PRNGKey(0), jnp.zeros((1, *image_shape)), train=False))
  assert variables["params"]["head"]["kernel"].shape == (
      variables["params"]["head"]["kernel"].shape[0], num_classes)
  if preset and preset.startswith("conadv"):
    assert config.method == "conadv" and config.staleness >= 1
  if name == "imagenet_resnet50":
    batch = preset.split("_")[-1]
    assert config.batch_size == imagenet_resnet50.BATCH_SIZES[batch]
    assert (config.aug_branch == "autoaugment") == ("_aa_" in preset)
    assert config.bn_group_size == IMAGENET_BN_GROUP_SIZES[batch] > 0


# The BN group of every ImageNet preset, as configs/imagenet_resnet50.py and docs/optimizers.md
# justify it: the per-core batch of the reference's 1,024-core TPU v3 slice from 32K up
# (98,304 / 1,024 = 96, 65,536 / 1,024 = 64, 32,768 / 1,024 = 32), and 32 below 32K (Goyal et
# al.'s per-worker batch). Written out, not read from the config module, so a changed table
# fails here.
IMAGENET_BN_GROUP_SIZES = {"1k": 32, "4k": 32, "8k": 32, "16k": 32, "32k": 32, "64k": 64,
                           "96k": 96}
REFERENCE_CORES = 1_024


def test_imagenet_bn_groups_are_the_reference_per_core_batches():
  assert set(IMAGENET_BN_GROUP_SIZES) == set(imagenet_resnet50.BATCH_SIZES)
  for batch, size in imagenet_resnet50.BATCH_SIZES.items():
    group = IMAGENET_BN_GROUP_SIZES[batch]
    if size >= 32_768:
      assert group == size // REFERENCE_CORES, batch
    else:
      assert group == 32, batch
    for preset in (f"vanilla_{batch}", f"disadv_{batch}", f"conadv_{batch}",
                   f"conadv2_{batch}", f"conadv_aa_{batch}", f"vanilla_aa_{batch}"):
      assert imagenet_resnet50.get_config(preset).bn_group_size == group, preset


@pytest.mark.parametrize("num_devices,grad_accum_steps", [(8, 128), (REFERENCE_CORES, 1)])
def test_headline_preset_validates_on_the_documented_device_counts(num_devices,
                                                                   grad_accum_steps):
  """conadv_aa_96k as docs/performance.md runs it: 8 accelerators with grad_accum_steps=128, or the
  reference's 1,024 cores with k=1. Either way a device's micro-batch is 96 examples, one BN
  group of the preset's 96, so the BN statistics are the reference's."""
  config = imagenet_resnet50.get_config("conadv_aa_96k")
  config.grad_accum_steps = grad_accum_steps
  config_validation.validate(config, num_devices=num_devices)
  assert config.batch_size // num_devices // grad_accum_steps == config.bn_group_size == 96


def test_imagenet_presets_follow_the_reference_recipe_table():
  expected = {"1k": (10.0, 5), "4k": (10.0, 5), "8k": (10.0, 5), "16k": (25.0, 5),
              "32k": (31.2, 25), "64k": (43.0, 41), "96k": (43.0, 41)}
  for batch, (lr, warmup) in expected.items():
    config = imagenet_resnet50.get_config(f"conadv_{batch}")
    assert (config.learning_rate, config.warmup_epochs) == (lr, warmup)
    assert config.optimizer == "lars" and config.lr_decay_power == 1.6
  assert imagenet_resnet50.get_config("vanilla_96k").num_train_steps == 1_301


# The reference code's LARS table (the paper's large-batch runs; docs/optimizers.md, "ImageNet /
# ResNet-50 recipe"), written out at both edges of every bracket, so a changed table fails here.
@pytest.mark.parametrize("batch_size,peak_lr,warmup_epochs", [
    (4_096, 10.0, 5), (16_383, 10.0, 5),
    (16_384, 25.0, 5), (32_767, 25.0, 5),
    (32_768, 31.2, 25), (65_535, 31.2, 25),
    (65_536, 43.0, 41), (98_304, 43.0, 41),
])
def test_imagenet_lars_recipe_brackets(batch_size, peak_lr, warmup_epochs):
  recipe = imagenet_resnet50.recipe(batch_size)
  assert recipe["optimizer"] == "lars"
  assert recipe["learning_rate"] == peak_lr
  assert recipe["warmup_epochs"] == warmup_epochs
  assert recipe["batch_size"] == batch_size
  assert recipe["momentum"] == 0.92
  assert recipe["weight_decay"] == 5e-5
  assert recipe["lars_trust_coefficient"] == 0.001
  assert recipe["lars_eps"] == 0.0
  assert recipe["lr_schedule"] == "polynomial"
  assert recipe["lr_decay_power"] == 1.6
  assert recipe["end_learning_rate"] == 0.0
  assert recipe["label_smoothing"] == 0.1


def test_imagenet_sgd_recipe():
  recipe = imagenet_resnet50.recipe(4_096, optimizer="sgd")
  assert recipe["optimizer"] == "sgd"
  assert recipe["nesterov"] is True
  assert recipe["momentum"] == 0.92
  assert math.isclose(recipe["learning_rate"], 1.6)
  assert recipe["warmup_epochs"] == 5
  with pytest.raises(ValueError, match="lamb"):
    imagenet_resnet50.recipe(4_096, optimizer="lamb")
  with pytest.raises(ValueError):
    imagenet_resnet50.recipe(0)


IMAGENET_TRAIN_EXAMPLES = 1_281_167


def test_imagenet_schedules_count_fractional_epochs_as_the_paper():
  """Steps = round(epochs · N / B) and warmup = round(warmup epochs · N / B), N = 1,281,167.

  The expected numbers are the paper's (91 epochs at 32K = 3,558 steps, 64K = 1,779, 96K = 1,301
  steps) and its warmup table (5 epochs below 32K, 25 at 32K, 41 from 64K); docs/optimizers.md,
  "ImageNet / ResNet-50 recipe", lists the warmup table and the 32K and 96K step counts.
  """
  paper_steps = {"32k": 3_558, "64k": 1_779, "96k": 1_301}
  paper_warmup_epochs = {"1k": 5, "4k": 5, "8k": 5, "16k": 5, "32k": 25, "64k": 41, "96k": 41}
  # The same warmups in steps, written out: round(epochs · 1,281,167 / B).
  paper_warmup_steps = {"1k": 6_256, "4k": 1_564, "8k": 782, "16k": 391, "32k": 977,
                        "64k": 802, "96k": 534}
  for batch, warmup_epochs in paper_warmup_epochs.items():
    size = imagenet_resnet50.BATCH_SIZES[batch]
    for preset in (f"vanilla_{batch}", f"conadv_{batch}", f"conadv_aa_{batch}"):
      config = imagenet_resnet50.get_config(preset)
      per_epoch = optim.steps_per_epoch(config.batch_size, input_config.published_info(config).num_train_examples)
      assert per_epoch == IMAGENET_TRAIN_EXAMPLES / size  # Not floored.
      total = optim.total_train_steps(config, per_epoch)
      if batch in paper_steps:
        assert total == paper_steps[batch], (preset, total)
      else:
        assert total == round(91 * IMAGENET_TRAIN_EXAMPLES / size)
      warmup = round(warmup_epochs * IMAGENET_TRAIN_EXAMPLES / size)
      assert warmup == paper_warmup_steps[batch]
      schedule = optim.create_learning_rate_schedule(config, per_epoch, total)
      assert float(schedule(warmup)) == pytest.approx(config.learning_rate, rel=1e-6)
      assert float(schedule(warmup - 1)) < config.learning_rate * (1 - 0.5 / warmup)


@pytest.mark.parametrize("preset", ["vanilla_4k", "conadv_32k", "conadv_aa_96k",
                                    "vanilla_aa_96k", "disadv_64k"])
def test_imagenet_presets_are_the_reference_run(preset):
  config = imagenet_resnet50.get_config(preset)
  assert config.loss_weighting == "mean" and config.model_init == "reference"
  attack = config.attack
  assert (attack.epsilon, attack.step_size, attack.num_steps, attack.targeted) == (4.0, 4.0, 1,
                                                                                  True)
  assert (attack.random_start, attack.random_start_prob) == ("per_batch", 0.8)
  assert config.bn_group_size == IMAGENET_BN_GROUP_SIZES[preset.split("_")[-1]]
  assert config.label_smoothing == 0.1 and config.dtype == "bfloat16"


@pytest.mark.parametrize("name,preset", [c for c in CASES if c[0] != "imagenet_resnet50"])
def test_small_data_presets_keep_the_per_example_attack_and_pgd_10(name, preset):
  """Only the ImageNet presets take the reference run's ε = 4 with one coin per batch."""
  config = load(name, preset)
  attack = config.attack
  assert (attack.epsilon, attack.step_size, attack.num_steps, attack.random_start) == (
      9.0, 9.0, 1, "per_example")
  assert (config.eval_pgd_steps, config.eval_pgd_epsilon) == (10, 8.0)
  if name == "fashion_mnist_study":  # Sharpness over a fixed subset of at least 2,048 examples.
    assert config.sharpness_num_examples >= 2_048


def test_unknown_preset_names_the_choices():
  with pytest.raises(ValueError, match="conadv"):
    imagenet_resnet50.get_config("conadv_3k")


def test_cpu_smoke_data_is_available_offline():
  info = prepare.get_dataset_info(load("cpu_smoke", "conadv"))
  assert info.num_train_examples == 256 and info.image_shape == (16, 16, 3)


# Read only by the loop and with no range: the ConfigDict's type check is their only rule.
LOOP_TYPE_ONLY = {"eval_adversarial"}


def test_every_default_field_has_a_validation_rule_and_no_rule_is_stale():
  """Validation reads every field of configs/default.py (its owner, the code built from it, or a
  validator rule checks it): without the field, validation fails on its name. A validator loop
  rule must name a field, and one that no dataclass or constructor built from the config reads
  (that reader owns its rule)."""
  from configs import default  # pylint: disable=g-import-not-at-top
  fields = set(config_history.flatten(default.get_config()))
  for field in sorted(fields - LOOP_TYPE_ONLY):
    config = load("cpu_smoke", "conadv").to_dict()
    *parents, leaf = field.split(".")
    del functools.reduce(lambda node, name: node[name], parents, config)[leaf]
    with pytest.raises((AttributeError, KeyError), match=leaf):
      config_validation.validate(ml_collections.ConfigDict(config), num_devices=4)
  owned = ({f.name for cls in (input_config.InputConfig, conadv.MethodConfig)
            for f in dataclasses.fields(cls)} |
           {f"attack.{f.name}" for f in dataclasses.fields(attacks.AttackConfig)} |
           set(inspect.signature(models.create_model).parameters))
  assert set(config_validation.LOOP_FIELD_RULES) <= fields - owned


@pytest.mark.parametrize("name,preset", CASES)
def test_three_step_quick_check_of_every_preset_builds(name, preset):
  """--config.num_train_steps=3: validation passes (a long warmup is clamped) and the run's
  state, optimizer and schedule build, from the registry's published sizes (no data needed)."""
  config = load(name, preset)
  config.num_train_steps = 3
  config_validation.validate(config, num_devices=_num_devices(name))
  exp = experiment.build(config, input_config.published_info(config),
                         parallel.make_mesh(jax.devices()[:_num_devices(name)]))
  assert exp.total_steps == 3
  if config.warmup_epochs * exp.steps_per_epoch >= 3:  # Clamped: the peak at the last step.
    assert float(exp.learning_rate_fn(3)) == pytest.approx(config.learning_rate, rel=1e-5)


def _first_batches(config, num=2):
  info = prepare.get_dataset_info(config)
  batches = itertools.islice(pipeline.train_batches(config, info, process_index=0,
                                                          process_count=1), num)
  return [b"".join(key.encode() + b[key].tobytes() for key in sorted(b)) for b in batches]


# Every name a string field can take, from the modules that own them.
NAMES = {"aug_branch": datasets.AUG_BRANCHES, "model": models.MODEL_NAMES,
         "dtype": models.DTYPES, "adv_bn": models.ADV_BN_MODES, "model_init": models.MODEL_INITS,
         "method": conadv.METHODS, "loss_weighting": conadv.LOSS_WEIGHTINGS,
         "attack.random_start": attacks.RANDOM_STARTS, "task_layout": parallel.TASK_LAYOUTS,
         "optimizer": optim.OPTIMIZERS, "lr_schedule": optim.SCHEDULES}


def _other_values(field: str, value) -> list:
  """Values other than `value` to try: numbers nudged, booleans flipped, every other allowed name.

  `dataset` is left out (another dataset needs its files; it is refused by name), and so are
  data_dir (None) and mlp_widths (a tuple).
  """
  if isinstance(value, bool):
    return [not value]
  if isinstance(value, int):
    return [value + 1 if value != -1 else 3]
  if isinstance(value, float):
    return [value * 0.5 + 0.25]
  if isinstance(value, str) and field != "dataset":
    return sorted(n for n in NAMES[field] if n != value)
  return []


@pytest.mark.parametrize("preset", ["conadv", "conadv_aa"])
def test_every_field_that_changes_the_data_is_refused_on_resume(preset):
  """Changes every field of a synthetic config in turn (names: to every other allowed name); if
  the first batches change (images, labels or the augmented view), a resume must refuse it."""
  base = load("cpu_smoke", preset)
  base.update(dict(image_size=8, synthetic_num_examples=128))
  reference = _first_batches(base)
  changes_data = set()
  for field, value in config_history.flatten(base).items():
    for other in _other_values(field, value):
      config = ml_collections.ConfigDict(base.to_dict())
      *parents, leaf = field.split(".")  # attack.epsilon: config.attack["epsilon"].
      functools.reduce(lambda c, name: c[name], parents, config)[leaf] = other
      try:
        batches = _first_batches(config)
      except Exception:  # pylint: disable=broad-except  # An invalid value: not a data change.
        continue
      if batches != reference:
        changes_data.add(field)
  refused = set(config_history.DATA_ORDER_FIELDS) | set(config_history.STEP_MEANING_FIELDS)
  assert {"seed", "batch_size", "image_size", "aug_branch"} <= changes_data
  assert changes_data <= refused, changes_data - refused


CONFIG_DIR = pathlib.Path(__file__).resolve().parents[1] / "configs"
CONFIG_FILES = sorted(CONFIG_DIR.rglob("*.py"))


def _imported_modules(source: str) -> set[str]:
  """Every module a source imports: import and from-import statements (absolute ones; a relative
  import stays inside configs/), and importlib.import_module / __import__ of a literal name."""
  modules = set()
  for node in ast.walk(ast.parse(source)):
    if isinstance(node, ast.Import):
      modules.update(alias.name for alias in node.names)
    elif isinstance(node, ast.ImportFrom) and not node.level:
      modules.add(node.module)
      modules.update(f"{node.module}.{alias.name}" for alias in node.names)
    elif (isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant)
          and isinstance(node.args[0].value, str)
          and ((isinstance(node.func, ast.Name) and node.func.id == "__import__")
               or (isinstance(node.func, ast.Attribute) and node.func.attr == "import_module"))):
      modules.add(node.args[0].value)
  return modules


def _is_library(module: str) -> bool:
  return module == "conadv_jax" or module.startswith("conadv_jax.")


def test_the_import_check_finds_library_imports():
  """The check below can fail: each way of importing the library is seen."""
  for source in ("import conadv_jax", "from conadv_jax.method import optim",
                 "import conadv_jax.method.optim as optim", "from conadv_jax import errors",
                 "import importlib\nimportlib.import_module('conadv_jax.method.optim')",
                 "def f():\n  from conadv_jax.method import optim  # A lazy import.\n",
                 "__import__('conadv_jax')"):
    assert any(_is_library(m) for m in _imported_modules(source)), source
  assert not any(_is_library(m) for m in _imported_modules(
      "from configs import common\nimport ml_collections\nimport conadv_jaxx"))


def test_no_config_file_imports_the_library():
  """Config files are plain data: they import the standard library, ml_collections, absl and
  each other, never conadv_jax (so a config loads, and a recipe is read, without the method)."""
  assert {p.name for p in CONFIG_FILES} >= {"default.py", "imagenet_resnet50.py",
                                            "fashion_mnist_lr_tuning.py"}
  offenders = {str(p.relative_to(CONFIG_DIR)): sorted(m for m in _imported_modules(p.read_text())
                                                       if _is_library(m))
               for p in CONFIG_FILES}
  assert not {f: m for f, m in offenders.items() if m}
  # The parse does see the files' imports.
  assert "configs.common" in _imported_modules((CONFIG_DIR / "imagenet_resnet50.py").read_text())


# A git hash (7 to 40 hex digits with at least one letter and one digit), an issue number, or
# words about the project's history.
PROVENANCE = re.compile(r"\b(?=[0-9a-f]*[a-f])(?=[0-9a-f]*[0-9])[0-9a-f]{7,40}\b|[Ii]ssue \d|"
                        r"\bsession\b|[Ww]as fixed|\bcommit\b")


@pytest.mark.parametrize("path", [p for p in CONFIG_FILES if "def get_" in p.read_text()],
                         ids=lambda p: str(p.relative_to(CONFIG_DIR)))
def test_config_docstring_is_command_expected_result_and_time(path):
  """Each config file's docstring: its command, what to expect and how long, in ~10 lines; the
  history of measurements lives in docs/ beside their commands."""
  source = path.read_text()
  doc = ast.get_docstring(ast.parse(source), clean=False)
  assert doc and len(doc.strip().splitlines()) <= 11, path
  assert re.search(r"^  python (main|scripts/sweep)\.py --\w+=configs/", doc, flags=re.M), path
  assert "expected" in doc.lower() and "time" in doc.lower(), path
  assert not PROVENANCE.search(source), PROVENANCE.search(source)
