"""Test setup: 4 fake CPU devices for the whole session, so meshes of 1, 3 and 4 devices can be
compared in one process (must run before JAX is imported), and the offline fixture."""
import os

import pytest

from cpu_env import xla_flags_with_devices

os.environ["XLA_FLAGS"] = xla_flags_with_devices(os.environ.get("XLA_FLAGS", ""), 4)
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")
os.environ.setdefault("JAX_PLATFORMS", "cpu")


@pytest.fixture
def offline(monkeypatch, tmp_path):
  """No Debian Fashion-MNIST files and no network, so only what a test sets up is found."""
  from conadv_jax.data import fashion_mnist  # Here, not above: JAX must see XLA_FLAGS first.
  monkeypatch.setattr(fashion_mnist, "DEBIAN_IDX_DIR", str(tmp_path / "no_debian_files"))

  def no_network(builder):
    raise ConnectionError(f"no network to download {builder.name}")

  monkeypatch.setattr(fashion_mnist, "_download_and_prepare_official", no_network)
