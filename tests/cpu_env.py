"""Environment for CPU runs with N fake devices (in-process via conftest, or subprocesses)."""
import os


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
