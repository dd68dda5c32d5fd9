"""Every mistake a user can type, through main.py: one `error:` line, exit status 2, no traceback.

Each bad value must stop the run before anything is compiled, within 30 s, with a message that
names the field (`config.<field>=<value> is not allowed: <what is>`) or the flag, file or folder.
Runs on 4 fake CPU devices, so cpu_smoke's batch of 32 is 8 per device.
"""
import functools
import math
import pathlib
import re
import subprocess
import sys
import time
import types

import ml_collections
import pytest
from cpu_env import cpu_env

from conadv_jax import errors
from conadv_jax.run import config_history, config_validation
from configs import cpu_smoke, default

REPO = pathlib.Path(__file__).resolve().parents[1]
CONFIG = f"--config={REPO / 'configs' / 'cpu_smoke.py'}:conadv"
NUM_DEVICES = 4

# (flags, field the message must name). cpu_smoke: batch_size 32, bn_group_size 8, conadv with
# staleness 1, num_epochs -1 with num_train_steps 12, warmup_epochs 0.25 (of 8 steps/epoch).
CASES = [
    (["--config.model=ResNet19"], "model"),
    (["--config.dataset=mnist"], "dataset"),
    (["--config.method=madry"], "method"),
    (["--config.optimizer=adam"], "optimizer"),
    (["--config.batch_size=30"], "batch_size"),  # Not a multiple of 4 devices.
    (["--config.bn_group_size=3"], "bn_group_size"),  # Does not divide 32.
    (["--config.bn_group_size=16"], "bn_group_size"),  # Larger than the 8 per device.
    (["--config.staleness=-1"], "staleness"),
    (["--config.method=disadv"], "staleness"),  # Staleness 1 needs conadv.
    (["--config.method=vanilla"], "staleness"),
    (["--config.staleness=0"], "staleness"),  # conadv needs >= 1; 0 is disadv.
    (["--config.attack.epsilon=-1"], "attack.epsilon"),
    (["--config.attack.step_size=0"], "attack.step_size"),
    (["--config.attack.step_size=-9"], "attack.step_size"),
    (["--config.attack.num_steps=0"], "attack.num_steps"),
    (["--config.attack.random_start_prob=-0.1"], "attack.random_start_prob"),
    (["--config.attack.random_start_prob=1.5"], "attack.random_start_prob"),
    (["--config.attack.random_start=per_row"], "attack.random_start"),
    (["--config.loss_weighting=median"], "loss_weighting"),
    (["--config.grad_accum_steps=0"], "grad_accum_steps"),
    (["--config.grad_accum_steps=3"], "grad_accum_steps"),  # 32 is not 4 devices x 3 micro-batches.
    (["--config.learning_rate=0"], "learning_rate"),
    (["--config.learning_rate=-0.1"], "learning_rate"),
    (["--config.learning_rate=nan"], "learning_rate"),
    (["--config.learning_rate=inf"], "learning_rate"),
    (["--config.num_train_steps=-1"], "num_epochs"),  # And num_epochs is -1: no length.
    (["--config.num_train_steps=0", "--config.num_epochs=0"], "num_train_steps"),
    (["--config.num_train_steps=-5"], "num_train_steps"),  # Not a silent "use num_epochs".
    # 0.01 epochs of 8 steps rounds to 0 steps.
    (["--config.num_train_steps=-1", "--config.num_epochs=0.01"], "num_epochs"),
    (["--config.keep_checkpoints=0"], "keep_checkpoints"),
    (["--config.image_size=-1"], "image_size"),
    (["--config.aug_branch=mixup"], "aug_branch"),
    (["--config.randaugment_num_layers=-1"], "randaugment_num_layers"),
    (["--config.randaugment_magnitude=10.5"], "randaugment_magnitude"),
    (["--config.small_resnet_width=0"], "small_resnet_width"),
    (["--config.small_resnet_depth=7"], "small_resnet_depth"),
    (["--config.model_init=tf"], "model_init"),
    (["--config.mlp_widths=(256,0)"], "mlp_widths"),
    (["--config.mlp_widths=()"], "mlp_widths"),
    (["--config.lr_schedule=step"], "lr_schedule"),
    (["--config.lr_decay_power=0"], "lr_decay_power"),
    (["--config.end_learning_rate=1.0"], "end_learning_rate"),  # Above the peak of 0.05.
    (["--config.momentum=1.5"], "momentum"),
    (["--config.label_smoothing=1.0"], "label_smoothing"),
    (["--config.eval_every_steps=0"], "eval_every_steps"),
    (["--config.eval_batch_size=6"], "eval_batch_size"),
    (["--config.seed=-1"], "seed"),
    (["--config.synthetic_num_classes=1"], "synthetic_num_classes"),
    (["--config.fifo_memory_limit_gib=-1"], "fifo_memory_limit_gib"),
    (["--config.fifo_memory_limit_gib=0.000001"], "staleness"),  # The FIFO needs 0.0000058 GiB.
    # Read from the train split's 256 examples after training, in the final sharpness measure.
    (["--config.sharpness_num_examples=1000"], "sharpness_num_examples"),
]


def _env(**extra: str) -> dict[str, str]:
  return cpu_env(NUM_DEVICES, **extra)


def _run_main(workdir: pathlib.Path | None, flags: list[str], config: str = CONFIG,
              cwd: pathlib.Path = REPO, **env: str) -> tuple[int, str, float]:
  """Runs main.py; returns (exit status, stdout + stderr, seconds)."""
  start = time.monotonic()
  args = [config] + ([f"--workdir={workdir}"] if workdir is not None else [])
  proc = subprocess.run(
      [sys.executable, str(REPO / "main.py"), *args, *flags],
      cwd=cwd, env=_env(**env), capture_output=True, text=True, timeout=120, check=False)
  return proc.returncode, proc.stdout + proc.stderr, time.monotonic() - start


def _assert_user_error(status: int, output: str, seconds: float) -> None:
  assert status == 2, output[-3000:]
  assert "error: " in output, output[-3000:]
  assert "Traceback" not in output, output[-3000:]
  assert seconds < 30, f"took {seconds:.1f} s"


@pytest.mark.parametrize("flags,field", CASES, ids=[" ".join(f) for f, _ in CASES])
def test_bad_field_fails_fast_with_its_name(tmp_path, flags, field):
  status, output, seconds = _run_main(tmp_path / "workdir", flags)
  _assert_user_error(status, output, seconds)
  assert f"config.{field}=" in output and "is not allowed:" in output, output[-3000:]
  # Nothing was trained: no checkpoint, no metrics.
  assert not (tmp_path / "workdir" / "checkpoints").exists()


# Bad values of every field of configs/default.py, each of the field's own type (the type-safe
# ConfigDict refuses other types), checked in-process (milliseconds each). The code that reads the
# field (its owner) or a validator rule must refuse each with config.<field>=<value>.
BAD_VALUES = {
    "dataset": ["mnist"],
    "data_dir": ["  "],
    "image_size": [-1, 5000],
    "shuffle_buffer_size": [0],
    "aug_branch": ["mixup"],
    "randaugment_num_layers": [-1],
    "randaugment_magnitude": [10.5],
    "eval_batch_size": [0, 6],  # 6: not a multiple of the 4 devices.
    "synthetic_num_examples": [0],
    "synthetic_num_classes": [1],
    "model": ["ResNet19"],
    "small_resnet_depth": [7],
    "small_resnet_width": [0],
    "mlp_widths": [(256, 0), ()],  # Read by create_model though cpu_smoke's model is no MLP.
    "dtype": ["float16"],
    "bn_group_size": [-1, 3, 16],  # 3 does not divide, 16 exceeds the 8 examples per device.
    "adv_bn": ["mixed"],
    "model_init": ["tf"],
    "method": ["madry"],
    "staleness": [-1, 0],  # conadv needs staleness >= 1.
    "clean_weight": [-1.0],
    "adv_weight": [math.nan],
    "label_smoothing": [1.0],
    "attack.epsilon": [-1.0],
    "attack.step_size": [0.0, -9.0],
    "attack.num_steps": [0],
    "attack.random_start_prob": [-0.1, 1.5],
    "attack.random_start": ["per_row"],
    "loss_weighting": ["median"],
    "task_layout": ["halves"],
    "grad_accum_steps": [0, 3],  # 3: 32 is not 4 devices x 3 micro-batches.
    "batch_size": [0, 30, 512],  # 512: more than the 256 training examples.
    "num_epochs": [math.inf],
    "num_train_steps": [0, -5],
    "optimizer": ["adam"],
    "learning_rate": [0.0, -0.1, math.nan, math.inf],
    "warmup_epochs": [-1.0],
    "lr_schedule": ["step"],
    "lr_decay_power": [0.0],
    "end_learning_rate": [-1.0, 1.0],  # 1.0: above the peak of 0.05.
    "weight_decay": [-1e-4],
    "momentum": [1.0],
    "lars_trust_coefficient": [0.0],  # Read by create_optimizer though cpu_smoke uses sgd.
    "lars_eps": [-1.0],
    "seed": [-1],
    "log_every_steps": [0],
    "eval_every_steps": [0],
    "checkpoint_every_steps": [0],
    "keep_checkpoints": [0],
    "eval_pgd_steps": [-1],
    "eval_pgd_epsilon": [math.nan],
    "sharpness_num_examples": [-1, 257],  # 257: more than the 256 training examples.
    "sharpness_iterations": [0],
    "prefetch_to_device": [-1],
    "fifo_memory_limit_gib": [-1.0],
    "profile_steps": [-1],
}
# Booleans have no bad value of their own type: their type is their rule, the ConfigDict's.
TYPE_ONLY = {"cache", "augment", "attack.targeted", "nesterov", "eval_adversarial"}
BAD_CASES = [(field, value) for field, values in BAD_VALUES.items() for value in values]


def _smoke_config_with(field: str, value) -> ml_collections.ConfigDict:
  """cpu_smoke's conadv config (type-safe and locked, as main.py gets it) with one field set."""
  config = cpu_smoke.get_config("conadv")
  *parents, leaf = field.split(".")
  functools.reduce(lambda node, name: node[name], parents, config)[leaf] = value
  return config


def test_every_default_field_has_bad_values_or_only_a_type():
  fields = set(config_history.flatten(default.get_config()))
  assert set(BAD_VALUES) | TYPE_ONLY == fields and not set(BAD_VALUES) & TYPE_ONLY
  assert all(BAD_VALUES.values())


def test_the_cpu_smoke_config_is_valid():  # So each case below fails on its one field only.
  config_validation.validate(_smoke_config_with("seed", 0), NUM_DEVICES)


@pytest.mark.parametrize("field,value", BAD_CASES, ids=[f"{f}={v!r}" for f, v in BAD_CASES])
def test_each_field_refuses_its_bad_values(field, value):
  with pytest.raises(errors.ConfigError) as raised:
    config_validation.validate(_smoke_config_with(field, value), NUM_DEVICES)
  message = str(raised.value)
  assert message.startswith(f"config.{field}={value!r} is not allowed: "), message


@pytest.mark.parametrize("field", sorted(TYPE_ONLY))
def test_type_only_fields_refuse_another_type(field):
  for value in (1, "true"):
    with pytest.raises(TypeError, match=field.split(".")[-1]):
      _smoke_config_with(field, value)


def test_unknown_fields_and_wrong_types_are_refused_by_the_config_itself():
  """The validator restates neither: the locked, type-safe ConfigDict refuses them when set."""
  config = cpu_smoke.get_config("conadv")
  with pytest.raises(AttributeError, match="learning_rate"):
    config.learnin_rate = 0.1
  with pytest.raises(AttributeError, match="epsilon"):
    config.attack.epsilom = 1.0
  with pytest.raises(TypeError, match="batch_size"):
    config.batch_size = 3.5
  with pytest.raises(TypeError, match="data_dir"):
    config.data_dir = 3


def test_sharpness_subset_larger_than_the_train_split_is_refused_before_training():
  config = cpu_smoke.get_config("conadv")  # 256 synthetic training examples.
  config.sharpness_num_examples = 256
  config_validation.validate(config, NUM_DEVICES)
  config.sharpness_num_examples = 257
  with pytest.raises(errors.ConfigError,
                     match=r"config\.sharpness_num_examples=257 is not allowed: .* only 256 "
                     r"examples; use at most 256 \(or raise config\.synthetic_num_examples\)"):
    config_validation.validate(config, NUM_DEVICES)
  # The prepared data may hold fewer examples than the registry's published count.
  config.sharpness_num_examples = 200
  with pytest.raises(errors.ConfigError,
                     match=re.escape("only 100 examples; use at most 100")):
    config_validation.validate_against_data(config, types.SimpleNamespace(num_train_examples=100))


def _assert_says_how_to_prepare_imagenet(output: str, data_dir: pathlib.Path) -> None:
  assert "imagenet2012 is not prepared" in output, output[-3000:]
  assert f"tfds build imagenet2012 --data_dir={data_dir}" in output
  assert f"{data_dir}/downloads/manual" in output


def test_unprepared_imagenet_says_how_to_prepare_it(tmp_path):
  data_dir = tmp_path / "tensorflow_datasets"  # Empty: TFDS's default dir, as on a new machine.
  data_dir.mkdir()
  status, output, seconds = _run_main(tmp_path / "workdir", ["--config.dataset=imagenet2012"],
                                      TFDS_DATA_DIR=str(data_dir))
  _assert_user_error(status, output, seconds)
  _assert_says_how_to_prepare_imagenet(output, data_dir)


def test_unprepared_imagenet_in_data_dir_flag_says_how_to_prepare_it(tmp_path):
  data_dir = tmp_path / "empty"
  data_dir.mkdir()
  status, output, seconds = _run_main(
      tmp_path / "workdir", ["--config.dataset=imagenet2012", f"--config.data_dir={data_dir}"])
  _assert_user_error(status, output, seconds)
  _assert_says_how_to_prepare_imagenet(output, data_dir)


def _broken_config(tmp_path: pathlib.Path, body: str) -> str:
  path = tmp_path / "broken.py"
  path.write_text("from configs import default\n\n\ndef get_config():\n" + body)
  return f"--config={path}"


# (config flag, extra flags, text the error must contain). Mistakes made while parsing the
# command line and loading the config file.
COMMAND_CASES = [
    ("missing_file", f"--config={REPO / 'configs' / 'no_such.py'}", [], "no_such.py"),
    ("unknown_preset", f"--config={REPO / 'configs' / 'cpu_smoke.py'}:madry", [], "madry"),
    ("unknown_field", CONFIG, ["--config.learnin_rate=0.1"], "learnin_rate"),
    ("wrong_type", CONFIG, ["--config.learning_rate=abc"], "learning_rate"),
    ("unknown_flag", CONFIG, ["--workdirr=/tmp/x"], "workdirr"),
    ("syntax_error", "SYNTAX", [], "broken.py, line"),
    ("raises", "RAISES", [], "broken.py, line 6"),
    ("file_unknown_field", "FILE_UNKNOWN_FIELD", [],
     'Did you mean "learning_rate" instead of "learnin_rate"?'),
    ("file_wrong_type", "FILE_WRONG_TYPE", [], "broken.py, line 6"),  # ml_collections: no name.
]
# Mistakes inside a config file, as a user editing a copy of configs/cpu_smoke.py makes them.
FILE_BODIES = {
    "SYNTAX": "  config = default.get_config(\n  return config\n",
    "RAISES": "  config = default.get_config()\n  config.nope.x = 1\n",
    "FILE_UNKNOWN_FIELD": ("  config = default.get_config()\n  config.learnin_rate = 0.1\n"
                           "  return config\n"),
    "FILE_WRONG_TYPE": ("  config = default.get_config()\n  config.learning_rate = 'abc'\n"
                        "  return config\n"),
}


@pytest.mark.parametrize("name,config,flags,text", COMMAND_CASES,
                         ids=[c[0] for c in COMMAND_CASES])
def test_command_line_and_config_file_mistakes(tmp_path, name, config, flags, text):
  del name
  if config in FILE_BODIES:
    config = _broken_config(tmp_path, FILE_BODIES[config])
  status, output, seconds = _run_main(tmp_path / "workdir", flags, config=config)
  _assert_user_error(status, output, seconds)
  assert text in output, output[-3000:]
  error_line = next(line for line in output.splitlines() if line.startswith("error: "))
  assert len(error_line) < 500, error_line  # Not every field of the config.
  assert not (tmp_path / "workdir").exists()


def test_empty_workdir_is_refused(tmp_path):
  status, output, seconds = _run_main(None, ["--workdir="], cwd=tmp_path)
  _assert_user_error(status, output, seconds)
  assert "--workdir is empty" in output
  assert not list(tmp_path.iterdir())  # Nothing written to the current directory.


def _written(workdir: pathlib.Path) -> set[str]:
  """What a refused run left in its workdir besides the (released) lock: should be nothing."""
  return {p.name for p in workdir.iterdir()} - {"run.lock"} if workdir.exists() else set()


def test_workdir_that_is_a_file_is_refused(tmp_path):
  (tmp_path / "file").write_text("not a folder")
  status, output, seconds = _run_main(tmp_path / "file", [])
  _assert_user_error(status, output, seconds)
  assert "is a file, not a folder" in output
  assert (tmp_path / "file").read_text() == "not a folder"


def test_workdir_that_cannot_be_created_is_refused(tmp_path):
  # Below a file: mkdir fails for root too (a read-only folder would not stop root).
  (tmp_path / "file").write_text("not a folder")
  status, output, seconds = _run_main(tmp_path / "file" / "run", [])
  _assert_user_error(status, output, seconds)
  assert "cannot be written" in output and "pass a folder you can write to" in output
  assert (tmp_path / "file").read_text() == "not a folder"


def test_data_dir_that_is_a_file_is_refused(tmp_path):
  (tmp_path / "data").write_text("")
  status, output, seconds = _run_main(
      tmp_path / "workdir", [f"--config.data_dir={tmp_path / 'data'}"],
      config=f"--config={REPO / 'configs' / 'fashion_mnist.py'}:conadv")
  _assert_user_error(status, output, seconds)
  assert str(tmp_path / "data") in output
  assert _written(tmp_path / "workdir") == set()


def test_corrupt_idx_file_is_named_with_the_fix(tmp_path):
  from conadv_jax.data import fashion_mnist  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  data = tmp_path / "fashion"
  data.mkdir()
  for split, count in (("train", 64), ("test", 16)):
    images_name, labels_name = fashion_mnist.IDX_FILES[split]
    fashion_mnist.write_idx(data / images_name, np.zeros([count, 28, 28], np.uint8))
    fashion_mnist.write_idx(data / labels_name, np.zeros([count], np.uint8))
  victim = data / fashion_mnist.IDX_FILES["train"][0]
  victim.write_bytes(victim.read_bytes()[:100])  # Truncated: a broken gzip stream.
  status, output, seconds = _run_main(
      tmp_path / "workdir", [f"--config.data_dir={data}", "--config.batch_size=32",
                             "--config.bn_group_size=8"],
      config=f"--config={REPO / 'configs' / 'fashion_mnist.py'}:conadv")
  _assert_user_error(status, output, seconds)
  assert str(victim) in output, output[-3000:]
  assert (f"To fix it, replace {victim} with an intact copy" in output and
          f"or remove the IDX files from {data}" in output), output[-3000:]
  assert _written(tmp_path / "workdir") == set()
