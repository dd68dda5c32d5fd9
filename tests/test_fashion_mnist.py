"""Tests for conadv_jax.data.fashion_mnist on tiny IDX files written here (no network)."""
import gzip
import os
import pathlib

import numpy as np
import pytest
import tensorflow_datasets as tfds

from conadv_jax import errors
from conadv_jax.data import fashion_mnist

NUM_TRAIN = 20
NUM_TEST = 8


def _write_fashion_idx(folder: pathlib.Path, seed: int = 0) -> dict[str, tuple[np.ndarray, ...]]:
  """Writes the four IDX files with random pixels; returns {split: (images, labels)}."""
  rng = np.random.default_rng(seed)
  folder.mkdir(parents=True, exist_ok=True)
  data = {}
  for split, count in (("train", NUM_TRAIN), ("test", NUM_TEST)):
    images = rng.integers(0, 256, size=(count, 28, 28), dtype=np.uint8)
    labels = (np.arange(count) % 10).astype(np.uint8)
    images_name, labels_name = fashion_mnist.IDX_FILES[split]
    fashion_mnist.write_idx(folder / images_name, images)
    fashion_mnist.write_idx(folder / labels_name, labels)
    data[split] = (images, labels)
  return data


def _examples(builder: tfds.core.DatasetBuilder, split: str) -> list[tuple[int, bytes]]:
  """(label, pixel bytes) of every example, sorted (TFDS stores them in a hashed order)."""
  ds = builder.as_dataset(split=split, shuffle_files=False)
  return sorted((int(ex["label"]), ex["image"].tobytes()) for ex in tfds.as_numpy(ds))


def test_idx_round_trip(tmp_path):
  array = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
  for name in ("a-idx3-ubyte.gz", "a-idx3-ubyte"):
    fashion_mnist.write_idx(tmp_path / name, array)
    read = fashion_mnist.read_idx(tmp_path / name, expected_ndim=3)
    np.testing.assert_array_equal(read, array)
    assert read.dtype == np.uint8


def test_read_idx_rejects_bad_files(tmp_path):
  bad_magic = tmp_path / "bad.gz"
  fashion_mnist.write_idx(bad_magic, np.zeros([3], np.uint8))
  with pytest.raises(fashion_mnist.IdxFormatError, match="magic"):
    fashion_mnist.read_idx(bad_magic, expected_ndim=3)  # A labels file where images belong.
  garbage = tmp_path / "garbage"
  garbage.write_bytes(b"\x12\x34\x56\x78" + bytes(10))
  with pytest.raises(fashion_mnist.IdxFormatError, match="magic"):
    fashion_mnist.read_idx(garbage)
  truncated = tmp_path / "truncated"
  fashion_mnist.write_idx(truncated, np.zeros([4, 5], np.uint8))
  truncated.write_bytes(truncated.read_bytes()[:-3])
  with pytest.raises(fashion_mnist.IdxFormatError, match="bytes"):
    fashion_mnist.read_idx(truncated)
  not_gzip = tmp_path / "not_gzip.gz"
  not_gzip.write_bytes(b"plain text")
  with pytest.raises(fashion_mnist.IdxFormatError):
    fashion_mnist.read_idx(not_gzip)
  bad_deflate = tmp_path / "bad_deflate.gz"  # A gzip header, then an invalid deflate block.
  bad_deflate.write_bytes(b"\x1f\x8b\x08\x00\x00\x00\x00\x00\x00\xff" + b"\xff" * 20)
  with pytest.raises(fashion_mnist.IdxFormatError, match=r"bad_deflate\.gz \(error: .*decompr"):
    fashion_mnist.read_idx(bad_deflate)


def test_builds_from_idx_files_in_data_dir_once(tmp_path, offline):
  del offline
  data_dir = tmp_path / "tfds"
  data = _write_fashion_idx(data_dir)

  builder = fashion_mnist.get_builder(str(data_dir))
  assert builder.name == "fashion_mnist_idx"
  assert builder.info.splits["train"].num_examples == NUM_TRAIN
  assert builder.info.splits["test"].num_examples == NUM_TEST
  assert builder.info.features["image"].shape == (28, 28, 1)
  assert builder.info.features["label"].num_classes == 10
  for split, (images, labels) in data.items():
    expected = sorted((int(label), image[..., None].tobytes())
                      for image, label in zip(images, labels))
    assert _examples(builder, split) == expected

  # The second call reuses the prepared files, even once the IDX files are gone.
  info_file = pathlib.Path(builder.data_path) / "dataset_info.json"
  mtime = os.stat(info_file).st_mtime_ns
  for names in fashion_mnist.IDX_FILES.values():
    for name in names:
      (data_dir / name).unlink()
  again = fashion_mnist.get_builder(str(data_dir))
  assert again.name == "fashion_mnist_idx"
  assert os.stat(info_file).st_mtime_ns == mtime
  assert _examples(again, "test") == _examples(builder, "test")


@pytest.fixture
def debian_idx_dir(tmp_path, offline, monkeypatch) -> pathlib.Path:
  """IDX files where Debian's dataset-fashion-mnist puts them (a folder of this test's)."""
  del offline
  idx_dir = tmp_path / "debian"
  _write_fashion_idx(idx_dir)
  monkeypatch.setattr(fashion_mnist, "DEBIAN_IDX_DIR", str(idx_dir))
  return idx_dir


def test_falls_back_to_debian_folder(tmp_path, debian_idx_dir):
  del debian_idx_dir
  data_dir = tmp_path / "tfds"
  builder = fashion_mnist.get_builder(str(data_dir))
  assert builder.info.splits["train"].num_examples == NUM_TRAIN
  assert str(builder.data_path).startswith(str(data_dir))


def test_corrupt_idx_file_gives_clear_error(tmp_path, offline):
  del offline
  data_dir = tmp_path / "tfds"
  _write_fashion_idx(data_dir)
  with gzip.open(data_dir / "t10k-images-idx3-ubyte.gz", "wb") as f:
    f.write(b"\x08\x03\x00\x00" + bytes(100))  # Byte-swapped magic number.
  with pytest.raises(fashion_mnist.IdxFormatError, match="t10k-images.*magic"):
    fashion_mnist.get_builder(str(data_dir))


def test_no_files_and_no_network_names_both_fixes(tmp_path, offline):
  del offline
  with pytest.raises(fashion_mnist.FashionMnistUnavailableError) as error:
    fashion_mnist.get_builder(str(tmp_path / "tfds"))
  message = str(error.value)
  assert "internet" in message
  assert "apt-get install dataset-fashion-mnist" in message
  assert "--config.data_dir=" in message
  assert isinstance(error.value, ValueError)


def test_errors_are_user_errors():
  for error in (fashion_mnist.IdxFormatError, fashion_mnist.FashionMnistUnavailableError):
    assert issubclass(error, errors.UserError) and issubclass(error, ValueError)


def test_corrupt_file_in_data_dir_says_to_replace_it(tmp_path, offline):
  del offline
  data_dir = tmp_path / "tfds"
  _write_fashion_idx(data_dir)
  labels = data_dir / "train-labels-idx1-ubyte.gz"
  labels.write_bytes(labels.read_bytes()[:-8])  # Cut off the gzip trailer.
  with pytest.raises(fashion_mnist.IdxFormatError) as error:
    fashion_mnist.get_builder(str(data_dir))
  message = str(error.value)
  assert f"Cannot read IDX file {labels}" in message
  assert f"To fix it, replace {labels} with an intact copy" in message
  assert f"remove the IDX files from {data_dir}" in message


def test_corrupt_file_in_debian_folder_says_to_reinstall(tmp_path, debian_idx_dir):
  images = debian_idx_dir / "t10k-images-idx3-ubyte.gz"
  fashion_mnist.write_idx(images, np.zeros([NUM_TEST, 28, 27], np.uint8))
  with pytest.raises(fashion_mnist.IdxFormatError) as error:
    fashion_mnist.get_builder(str(tmp_path / "tfds"))
  message = str(error.value)
  assert f"{images}: images are (28, 27)" in message
  assert "`sudo apt-get install --reinstall dataset-fashion-mnist`" in message


def test_unreadable_prepared_copy_says_to_delete_it(tmp_path, offline):
  del offline
  data_dir = tmp_path / "tfds"
  _write_fashion_idx(data_dir)
  builder = fashion_mnist.get_builder(str(data_dir))
  (pathlib.Path(builder.data_path) / "features.json").write_text("[")
  (pathlib.Path(builder.data_path) / "dataset_info.json").write_text("[")
  with pytest.raises(fashion_mnist.FashionMnistUnavailableError) as error:
    fashion_mnist.get_builder(str(data_dir))
  folder = data_dir / "fashion_mnist_idx"
  assert f"The prepared fashion_mnist_idx in {folder} cannot be read" in str(error.value)
  assert f"Delete {folder} and run again" in str(error.value)


def test_prepare_false_only_reads_a_prepared_copy(tmp_path, offline):
  """What processes other than 0 call: never convert, so two processes never write one folder."""
  del offline
  data_dir = tmp_path / "tfds"
  _write_fashion_idx(data_dir)
  with pytest.raises(fashion_mnist.FashionMnistNotPreparedError, match=str(data_dir)):
    fashion_mnist.get_builder(str(data_dir), prepare=False)
  assert not (data_dir / "fashion_mnist_idx").exists()  # Nothing was written.
  prepared = fashion_mnist.get_builder(str(data_dir))
  again = fashion_mnist.get_builder(str(data_dir), prepare=False)
  assert again.data_path == prepared.data_path
  assert _examples(again, "test") == _examples(prepared, "test")
