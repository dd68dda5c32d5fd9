"""Test setup: 4 fake CPU devices for the whole session, so meshes of 1, 3 and 4 devices can be
compared in one process. Must run before JAX is imported."""
import os

from cpu_env import xla_flags_with_devices

os.environ["XLA_FLAGS"] = xla_flags_with_devices(os.environ.get("XLA_FLAGS", ""), 4)
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
