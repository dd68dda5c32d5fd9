"""main.py: shrunken copies of the paper's ImageNet presets run through it on a CPU; --help
needs neither JAX nor TensorFlow; the config and the workdir are checked once, before TensorFlow.

Only overrides (the shrunken CPU run of docs/optimizers.md, plus a checkpoint every 2
steps so that a save runs too): synthetic data, 32-pixel images, a batch of 16 with BN groups of
4, 3 steps. Everything else is the preset's: ResNet-50
with the reference init, three branches (AutoAugment view), losses averaged, the ε = 4 attack
with one coin per batch, LARS. With and without gradient accumulation, and ConAdv with tasks A
and B on separate devices (task_layout=split, 2 devices).
"""
import json
import pathlib
import subprocess
import sys

import pytest
from cpu_env import cpu_env, no_tensorflow_env

REPO = pathlib.Path(__file__).resolve().parents[1]
SHRINK = ["--config.dataset=synthetic", "--config.image_size=32", "--config.batch_size=16",
          "--config.bn_group_size=4", "--config.num_train_steps=3", "--config.eval_batch_size=16",
          "--config.synthetic_num_examples=64", "--config.synthetic_num_classes=10",
          "--config.checkpoint_every_steps=2", "--config.eval_pgd_steps=0"]


@pytest.mark.parametrize("preset,accum,layout", [
    ("conadv_aa_96k", 1, "shared"), ("conadv_aa_96k", 2, "shared"),
    ("vanilla_aa_4k", 1, "shared"), ("vanilla_aa_4k", 2, "shared"),
    ("conadv_aa_96k", 1, "split")])
def test_shrunken_imagenet_preset_runs_through_main(preset, accum, layout, tmp_path):
  workdir = tmp_path / preset
  command = [sys.executable, str(REPO / "main.py"),
             f"--config={REPO / 'configs' / 'imagenet_resnet50.py'}:{preset}",
             f"--workdir={workdir}", *SHRINK, f"--config.grad_accum_steps={accum}",
             f"--config.task_layout={layout}"]
  done = subprocess.run(command, cwd=REPO, env=cpu_env(2 if layout == "split" else 1),
                        capture_output=True, text=True, timeout=900, check=False)
  assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
  results = json.loads((workdir / "results.json").read_text())
  config = results["config"]
  assert results["final_step"] == 3 and config["grad_accum_steps"] == accum
  assert config["task_layout"] == layout
  mesh = "{'task': 2, 'data': 1}" if layout == "split" else "{'data': 1}"
  assert f"on {2 if layout == 'split' else 1} devices (mesh {mesh})" in done.stderr
  assert (config["model"], config["aug_branch"], config["loss_weighting"]) == (
      "ResNet50", "autoaugment", "mean")
  train = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()
           if json.loads(line)["kind"] == "train"]
  assert train and {"aug_loss", "clean_loss"} <= set(train[-1])
  assert ("adv_loss" in train[-1]) == preset.startswith("conadv")


def test_help_needs_neither_jax_nor_tensorflow(tmp_path):
  env = no_tensorflow_env(tmp_path)
  (tmp_path / "jax").mkdir()
  (tmp_path / "jax" / "__init__.py").write_text("raise ImportError('jax was imported')\n")
  done = subprocess.run([sys.executable, str(REPO / "main.py"), "--help"], cwd=REPO, env=env,
                        capture_output=True, text=True, timeout=120, check=False)
  assert done.returncode == 1, done.stdout[-3000:] + done.stderr[-3000:]  # absl's status.
  assert "--workdir" in done.stdout and "--distributed_timeout" in done.stdout
  assert "Traceback" not in done.stderr and "was imported" not in done.stderr


# Runs main.py (argv[1:]) with config_validation.validate and workdir.prepare counted, noting
# whether TensorFlow was already imported at each call.
_COUNT_CHECKS = """
import runpy, sys
from conadv_jax.run import config_validation, workdir
calls = []
def count(module, name):
  real = getattr(module, name)
  def counted(*args, **kwargs):
    calls.append(name + (" after tensorflow" if "tensorflow" in sys.modules else ""))
    return real(*args, **kwargs)
  setattr(module, name, counted)
count(config_validation, "validate")
count(workdir, "prepare")
sys.argv = sys.argv[1:]
try:
  runpy.run_path(sys.argv[0], run_name="__main__")
finally:
  print("checks:", calls, flush=True)
"""


def test_config_and_workdir_are_checked_once_before_tensorflow(tmp_path):
  workdir = tmp_path / "run"
  command = [sys.executable, "-c", _COUNT_CHECKS, str(REPO / "main.py"),
             f"--config={REPO / 'configs' / 'cpu_smoke.py'}:vanilla", f"--workdir={workdir}",
             "--config.num_train_steps=2", "--config.sharpness_num_examples=0"]
  done = subprocess.run(command, cwd=REPO, env=cpu_env(1), capture_output=True, text=True,
                        timeout=900, check=False)
  assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
  assert "checks: ['validate', 'prepare']" in done.stdout, done.stdout[-3000:]
  assert json.loads((workdir / "results.json").read_text())["final_step"] == 2
