"""Config validation through main.py, as a user meets it: one case per rule.

Each bad value must stop the run before anything is compiled, within 30 s, with a non-zero exit
status, a message that names the field (`config.<field>=<value> is not allowed: <what is>`) and
no traceback. Runs on 4 fake CPU devices, so cpu_smoke's batch of 32 is 8 per device.
"""
import pathlib
import subprocess
import sys
import time

import pytest
from cpu_env import cpu_env

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
    (["--config.learning_rate=0"], "learning_rate"),
    (["--config.learning_rate=-0.1"], "learning_rate"),
    (["--config.learning_rate=nan"], "learning_rate"),
    (["--config.learning_rate=inf"], "learning_rate"),
    (["--config.warmup_epochs=100"], "warmup_epochs"),  # 800 warmup steps in a 12-step run.
    (["--config.num_train_steps=-1"], "num_epochs"),  # And num_epochs is -1: no length.
    (["--config.num_train_steps=0", "--config.num_epochs=0"], "num_epochs"),
]


def _env(**extra: str) -> dict[str, str]:
  return cpu_env(NUM_DEVICES, **extra)


def _run_main(workdir: pathlib.Path, flags: list[str], **env: str) -> tuple[int, str, float]:
  """Runs main.py; returns (exit status, stdout + stderr, seconds)."""
  start = time.monotonic()
  proc = subprocess.run(
      [sys.executable, str(REPO / "main.py"), CONFIG, f"--workdir={workdir}", *flags],
      cwd=REPO, env=_env(**env), capture_output=True, text=True, timeout=120, check=False)
  return proc.returncode, proc.stdout + proc.stderr, time.monotonic() - start


def _assert_user_error(status: int, output: str, seconds: float) -> None:
  assert status != 0, output[-3000:]
  assert "Traceback" not in output, output[-3000:]
  assert seconds < 30, f"took {seconds:.1f} s"


@pytest.mark.parametrize("flags,field", CASES, ids=[" ".join(f) for f, _ in CASES])
def test_bad_field_fails_fast_with_its_name(tmp_path, flags, field):
  status, output, seconds = _run_main(tmp_path / "workdir", flags)
  _assert_user_error(status, output, seconds)
  assert f"config.{field}=" in output and "is not allowed:" in output, output[-3000:]
  # Nothing was trained: no checkpoint, no metrics.
  assert not (tmp_path / "workdir" / "checkpoints").exists()


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
