"""The package's three parts and the direction of their imports.

method/ (the train step, attacks, models, optimizer, mesh) needs jax, flax and optax alone; data/
may import neither the run nor the method; run/ puts the two together. Checked twice: statically
over every import statement (also those inside functions), and by running the method where
importing TensorFlow fails.
"""
import ast
import pathlib
import subprocess
import sys

import pytest
from cpu_env import no_tensorflow_env

REPO = pathlib.Path(__file__).resolve().parents[1]
PACKAGE = REPO / "conadv_jax"
# Imports a part must not make, as module-name prefixes.
FORBIDDEN = {
    "method": ("conadv_jax.data", "conadv_jax.run", "tensorflow", "tensorflow_datasets",
               "absl.flags", "clu", "orbax"),
    "data": ("conadv_jax.run", "conadv_jax.method"),
}


def imported_modules(path: pathlib.Path) -> set[str]:
  """Every module an `import` or `from ... import` in `path` names (`from a import b`: a, a.b)."""
  names = set()
  for node in ast.walk(ast.parse(path.read_text())):
    if isinstance(node, ast.Import):
      names.update(alias.name for alias in node.names)
    elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
      names.add(node.module)
      names.update(f"{node.module}.{alias.name}" for alias in node.names)
  return names


def _violations(paths, forbidden) -> list[str]:
  return sorted(f"{path.name} imports {name}" for path in paths
                for name in imported_modules(path)
                if any(name == f or name.startswith(f + ".") for f in forbidden))


@pytest.mark.parametrize("part", sorted(FORBIDDEN))
def test_part_does_not_import_what_it_must_not(part):
  modules = sorted((PACKAGE / part).glob("*.py"))
  assert len(modules) > 3, modules
  assert _violations(modules, FORBIDDEN[part]) == []


def test_the_import_check_sees_nested_and_from_imports(tmp_path):
  """The static check can fail: a function-level `from absl import flags` is seen."""
  module = tmp_path / "m.py"
  module.write_text("def f():\n  from absl import flags\n  import conadv_jax.run.train\n")
  found = {line.split(" imports ")[1] for line in _violations([module], FORBIDDEN["method"])}
  assert found == {"absl.flags", "conadv_jax.run.train"}


def test_memory_report_needs_no_tensorflow():
  """It runs where the benchmarks run: the method and the registry's published sizes only."""
  script = REPO / "scripts" / "memory_report.py"
  data = {n for n in imported_modules(script) if n.startswith("conadv_jax.data")}
  assert data <= {"conadv_jax.data", "conadv_jax.data.input_config"}, data
  for module in ("input_config.py", "datasets.py"):
    assert _violations([PACKAGE / "data" / module], ("tensorflow", "tensorflow_datasets")) == []


def test_benchmarks_import_the_method_directly():
  for script in ("benchmark_step.py", "benchmark_tasks.py"):
    names = imported_modules(REPO / "scripts" / script)
    assert any(n.startswith("conadv_jax.method") for n in names), script
    assert _violations([REPO / "scripts" / script],
                       ("conadv_jax.data", "conadv_jax.run", "tensorflow")) == []


_STEP_WITHOUT_TENSORFLOW = """
import dataclasses, sys
import numpy as np
import jax
from configs import default
from conadv_jax.method import experiment, parallel

@dataclasses.dataclass(frozen=True)
class Data:
  num_classes: int = 10
  image_shape: tuple = (8, 8, 1)
  num_train_examples: int = 64
  pixel_mean: tuple = (127.5,)
  pixel_std: tuple = (73.6,)

config = default.get_config()
config.update(dict(model="MLP", mlp_widths=(16,), batch_size=8, num_train_steps=3,
                   method="conadv", staleness=1, synthetic_num_classes=10))
exp = experiment.build(config, Data())
state = exp.init_state()
rng = np.random.RandomState(0)
sharding = parallel.batch_sharding(exp.mesh)
def batch():
  return jax.device_put({"image": rng.randint(0, 256, (8, 8, 8, 1)).astype(np.uint8),
                         "label": rng.randint(0, 10, (8,)).astype(np.int32)}, sharding)
batches = [batch() for _ in range(3)]
state = exp.fill_fifo(state, batches[:1])
for t in range(2):
  state, metrics = exp.train_step(state, batches[t], batches[t + 1])
assert int(state.step) == 2 and np.isfinite(float(metrics["loss"]))
loaded = sorted(m for m in sys.modules if m.split(".")[0] in ("tensorflow", "tensorflow_datasets")
                or m.startswith(("conadv_jax.data", "conadv_jax.run")))
print("LOADED", loaded)
"""


def test_the_method_builds_and_steps_without_tensorflow(tmp_path):
  proc = subprocess.run([sys.executable, "-c", _STEP_WITHOUT_TENSORFLOW], cwd=REPO,
                        env=no_tensorflow_env(tmp_path), capture_output=True, text=True,
                        timeout=300, check=False)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert "LOADED []" in proc.stdout, proc.stdout


def test_the_stand_in_tensorflow_does_fail_to_import(tmp_path):
  """The environment above really forbids TensorFlow: the data part cannot load in it."""
  proc = subprocess.run([sys.executable, "-c", "import conadv_jax.run.train"], cwd=REPO,
                        env=no_tensorflow_env(tmp_path), capture_output=True, text=True,
                        timeout=300, check=False)
  assert proc.returncode != 0
  assert "must run without it" in proc.stderr
