"""Environment for CPU runs with N fake devices (in-process via conftest, or subprocesses)."""
import os
import pathlib


def xla_flags_with_devices(xla_flags: str, num_devices: int) -> str:
  """`xla_flags` with its fake-device count replaced by `num_devices`."""
  kept = [f for f in xla_flags.split()
          if not f.startswith("--xla_force_host_platform_device_count")]
  return " ".join(kept + [f"--xla_force_host_platform_device_count={num_devices}"])


def cpu_env(num_devices: int, **extra: str) -> dict[str, str]:
  """os.environ for a CPU-only subprocess with `num_devices` fake devices."""
  env = dict(os.environ, JAX_PLATFORMS="cpu", TF_CPP_MIN_LOG_LEVEL="2", CUDA_VISIBLE_DEVICES="",
             **extra)
  env["XLA_FLAGS"] = xla_flags_with_devices(env.get("XLA_FLAGS", ""), num_devices)
  return env


def no_tensorflow_env(tmp_path: pathlib.Path) -> dict[str, str]:
  """An environment in which `import tensorflow` (or tensorflow_datasets) raises ImportError."""
  for name in ("tensorflow", "tensorflow_datasets"):
    (tmp_path / name).mkdir(parents=True)
    (tmp_path / name / "__init__.py").write_text(
        f"raise ImportError('{name} was imported, but this code must run without it')\n")
  env = dict(os.environ, JAX_PLATFORMS="cpu", CUDA_VISIBLE_DEVICES="")
  repo = pathlib.Path(__file__).resolve().parents[1]
  env["PYTHONPATH"] = os.pathsep.join([str(tmp_path), str(repo), env.get("PYTHONPATH", "")])
  return env
