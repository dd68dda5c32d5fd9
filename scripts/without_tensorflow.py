"""Runs a repo script with tensorflow and tensorflow_datasets replaced by inert stand-ins.

  python3 scripts/without_tensorflow.py scripts/benchmark_step.py --model=ResNet50 ...

conadv_jax.data.input_pipeline (imported by experiment and evaluation, so by benchmark_step and
memory_report) and its imports augment, autoaugment and fashion_mnist do `import tensorflow as
tf` / `import tensorflow_datasets as tfds` at module level. On synthetic data (benchmark_step)
or registry shapes (memory_report) nothing runs them: they appear in annotations, decorators,
and fashion_mnist's TFDS builder class. The stand-ins accept all of that while conadv_jax is
imported (below), then turn strict: any later call raises a RuntimeError naming the attribute,
so a benchmark can never run on a stand-in silently. Not for training: main.py / train.py need
tf.data and clu for real.
"""
import os
import pathlib
import runpy
import sys
import types

_STRICT = False


class _Absent:
  """Any attribute of a missing module. Permissive while importing, then every call fails."""

  def __init__(self, name):
    self._name = name

  def __getattr__(self, attr):
    if attr.startswith("__"):
      raise AttributeError(attr)
    return _Absent(f"{self._name}.{attr}")

  def __call__(self, *args, **kwargs):
    if not _STRICT:
      if len(args) == 1 and not kwargs and callable(args[0]):  # A decorator.
        return args[0]
      return _Absent(f"{self._name}(...)")
    raise RuntimeError(f"{self._name}(...) was called, but TensorFlow is not installed here "
                       "(scripts/without_tensorflow.py stands in for it)")

  def __mro_entries__(self, bases):  # class FashionMnistIdx(tfds.core.GeneratorBasedBuilder)
    return (object,)

  def __or__(self, other):  # Annotations such as `tf.Tensor | int`.
    return self

  __ror__ = __or__

  def __getitem__(self, key):
    return self

  def __repr__(self):
    return f"<absent {self._name}>"


def _install(name):
  if name in sys.modules:
    return
  module = types.ModuleType(name, f"Stand-in for {name} (scripts/without_tensorflow.py)")
  module.__getattr__ = lambda attr: _Absent(f"{name}.{attr}")  # PEP 562
  sys.modules[name] = module


for _name in ("tensorflow", "tensorflow_datasets"):
  _install(_name)

sys.path.insert(0, os.environ.get("CONADV_REPO", str(pathlib.Path(__file__).resolve().parents[1])))  # Repo root.
import conadv_jax.method.experiment  # pylint: disable=g-import-not-at-top,unused-import,wrong-import-position
import conadv_jax.data.input_pipeline  # pylint: disable=g-import-not-at-top,unused-import,wrong-import-position
_STRICT = True

if __name__ == "__main__":
  script = sys.argv[1]
  sys.argv = sys.argv[1:]
  runpy.run_path(script, run_name="__main__")
