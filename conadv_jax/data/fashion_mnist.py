"""Fashion-MNIST from the four original IDX files, as a TFDS dataset.

TFDS's own `fashion_mnist` builder only prepares from its download, whose checksums the Debian
copy (`apt-get install dataset-fashion-mnist`) does not match. So `FashionMnistIdx` converts the
IDX files of a local folder once into a TFDS dataset `fashion_mnist_idx` with the same features
and splits; `get_builder` picks whichever source is available, so training works offline.
"""
from collections.abc import Callable, Sequence
import gzip
import inspect
import os
import struct
import zlib

from absl import logging
from etils import epath
import numpy as np
import tensorflow_datasets as tfds

from conadv_jax import errors

# Where Debian's dataset-fashion-mnist package puts the IDX files.
DEBIAN_IDX_DIR = "/usr/share/datasets/fashion-mnist"
HOMEPAGE = "https://github.com/zalandoresearch/fashion-mnist"

IDX_FILES = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}

CLASS_NAMES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt",
               "Sneaker", "Bag", "Ankle boot")

# IDX type codes (third byte of the magic number) and the big-endian dtypes they stand for.
_IDX_DTYPES = {
    0x08: np.dtype(">u1"),
    0x09: np.dtype(">i1"),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}


class IdxFormatError(errors.UserError, ValueError):
  """An IDX file is truncated, corrupt or not the array we expect; the message says the fix."""


class FashionMnistUnavailableError(errors.UserError, ValueError):
  """Fashion-MNIST is not readably prepared, not in local IDX files and not downloadable."""


def _idx_error(path: str, problem: str) -> IdxFormatError:
  """An IdxFormatError whose message ends with how to get an intact copy of `path`."""
  folder = os.path.dirname(os.path.abspath(path))
  if folder == os.path.abspath(DEBIAN_IDX_DIR):
    fix = ("reinstall the package that installed it: "
           "`sudo apt-get install --reinstall dataset-fashion-mnist`.")
  else:
    fix = (f"replace {path} with an intact copy (e.g. from {DEBIAN_IDX_DIR} after `apt-get "
           f"install dataset-fashion-mnist`, or from {HOMEPAGE}), or remove the IDX files from "
           f"{folder} so that the Debian copy or the TFDS download is used instead.")
  return IdxFormatError(f"{problem} To fix it, {fix}")


def read_idx(path: str | os.PathLike[str], expected_ndim: int | None = None) -> np.ndarray:
  """Reads an IDX file (gzipped when its name ends in .gz) into a native-endian array.

  Args:
    path: The file.
    expected_ndim: If given, the number of dimensions the file must declare (3 for images, 1 for
      labels); a mismatch means the wrong file was put under that name.

  Returns:
    The array, with the file's element type in native byte order.

  Raises:
    IdxFormatError: the magic number, shape or length is not a valid IDX array.
  """
  path = os.fspath(path)
  opener = gzip.open if path.endswith(".gz") else open
  try:
    with opener(path, "rb") as f:
      data = f.read()
  except (OSError, EOFError, zlib.error) as e:  # gzip.BadGzipFile is an OSError.
    raise _idx_error(path, f"Cannot read IDX file {path} ({type(e).__name__}: {e}).") from e
  if len(data) < 4:
    raise _idx_error(path, f"{path} is not an IDX file: only {len(data)} bytes.")
  zero, type_code, ndim = struct.unpack(">HBB", data[:4])
  if zero != 0 or type_code not in _IDX_DTYPES or ndim == 0:
    raise _idx_error(
        path, f"{path} is not an IDX file: bad magic number 0x{data[:4].hex()} (expected 00 00, "
        "a type code such as 08 for ubyte, and the number of dimensions, e.g. 00000803 for "
        "images).")
  if expected_ndim is not None and ndim != expected_ndim:
    raise _idx_error(
        path, f"{path}: IDX file has {ndim} dimensions (magic 0x{data[:4].hex()}), expected "
        f"{expected_ndim}.")
  header_end = 4 + 4 * ndim
  if len(data) < header_end:
    raise _idx_error(path, f"{path}: IDX header truncated.")
  shape = struct.unpack(f">{ndim}I", data[4:header_end])
  dtype = _IDX_DTYPES[type_code]
  expected_bytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
  if len(data) - header_end != expected_bytes:
    raise _idx_error(
        path, f"{path}: IDX shape {shape} needs {expected_bytes} bytes of data, the file has "
        f"{len(data) - header_end} (truncated or corrupt).")
  array = np.frombuffer(data, dtype=dtype, offset=header_end).reshape(shape)
  return array.astype(dtype.newbyteorder("="))


def write_idx(path: str | os.PathLike[str], array: np.ndarray) -> None:
  """Writes `array` as an IDX file (gzipped when the name ends in .gz); the inverse of read_idx.

  Used by tests to make small Fashion-MNIST-like folders without network access.
  """
  array = np.asarray(array)
  codes = {dtype.newbyteorder("="): code for code, dtype in _IDX_DTYPES.items()}
  code = codes.get(array.dtype.newbyteorder("="))
  if code is None:
    raise ValueError(f"IDX cannot store dtype {array.dtype}.")
  header = struct.pack(f">HBB{array.ndim}I", 0, code, array.ndim, *array.shape)
  payload = header + array.astype(_IDX_DTYPES[code]).tobytes()
  path = os.fspath(path)
  opener = gzip.open if path.endswith(".gz") else open
  with opener(path, "wb") as f:
    f.write(payload)


def has_idx_files(folder: str | os.PathLike[str] | None) -> bool:
  """Whether `folder` holds all four Fashion-MNIST IDX files."""
  if not folder:
    return False
  return all(
      os.path.isfile(os.path.join(folder, name)) for names in IDX_FILES.values() for name in names)


def load_split(folder: str | os.PathLike[str], split: str) -> tuple[np.ndarray, np.ndarray]:
  """Returns (images uint8 (N, 28, 28), labels uint8 (N,)) of `split` read from `folder`."""
  images_name, labels_name = IDX_FILES[split]
  images_path = os.path.join(folder, images_name)
  labels_path = os.path.join(folder, labels_name)
  images = read_idx(images_path, expected_ndim=3)
  labels = read_idx(labels_path, expected_ndim=1)
  if images.dtype != np.uint8:
    raise _idx_error(images_path, f"{images_path}: expected ubyte data, got {images.dtype}.")
  if labels.dtype != np.uint8:
    raise _idx_error(labels_path, f"{labels_path}: expected ubyte data, got {labels.dtype}.")
  if images.shape[1:] != (28, 28):
    raise _idx_error(images_path,
                     f"{images_path}: images are {images.shape[1:]}, expected (28, 28).")
  if len(images) != len(labels):
    raise _idx_error(
        images_path,
        f"{images_path} has {len(images)} images but {labels_path} has {len(labels)} labels.")
  if labels.size and labels.max() >= len(CLASS_NAMES):
    raise _idx_error(labels_path,
                     f"{labels_path}: label {labels.max()} is not in [0, {len(CLASS_NAMES)}).")
  return images, labels


class FashionMnistIdx(tfds.core.GeneratorBasedBuilder):
  """Fashion-MNIST prepared from the IDX files in the download config's manual_dir."""

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "Fashion-MNIST converted from the original IDX files."}
  MANUAL_DOWNLOAD_INSTRUCTIONS = (
      "Put the four Fashion-MNIST IDX files (" +
      ", ".join(name for names in IDX_FILES.values() for name in names) +
      ") in a folder, e.g. with `apt-get install dataset-fashion-mnist` (which installs them in "
      f"{DEBIAN_IDX_DIR}), and pass that folder as manual_dir.")

  @tfds.core.utils.classproperty
  @classmethod
  def code_path(cls) -> epath.Path:
    # TFDS's own lookup needs the `importlib_resources` backport (an `etils[epath]` extra) that
    # some environments lack; this file's path is all TFDS wants it for (to find checksums.tsv,
    # which a builder that downloads nothing does not have).
    return epath.Path(inspect.getfile(cls))

  def _info(self) -> tfds.core.DatasetInfo:
    return tfds.core.DatasetInfo(
        builder=self,
        description=("Fashion-MNIST (Zalando): 28x28 grayscale images of 10 kinds of clothing, "
                     "60k train / 10k test, read from the original IDX files."),
        features=tfds.features.FeaturesDict({
            "image": tfds.features.Image(shape=(28, 28, 1)),
            "label": tfds.features.ClassLabel(names=CLASS_NAMES),
        }),
        supervised_keys=("image", "label"),
        homepage=HOMEPAGE,
    )

  def _split_generators(self, dl_manager: tfds.download.DownloadManager):
    folder = dl_manager.manual_dir
    return {split: self._generate_examples(folder, split) for split in IDX_FILES}

  def _generate_examples(self, folder, split: str):
    images, labels = load_split(folder, split)
    for index, (image, label) in enumerate(zip(images, labels)):
      yield index, {"image": image[..., None], "label": int(label)}


def _idx_folders(data_dir: str | None) -> Sequence[str]:
  """Folders to look for the IDX files in, most specific first."""
  return [folder for folder in (data_dir, DEBIAN_IDX_DIR) if folder]


def _download_and_prepare_official(builder: tfds.core.DatasetBuilder) -> None:
  """Downloads and prepares TFDS's fashion_mnist (a seam so tests can simulate no network)."""
  builder.download_and_prepare()


def _open_builder(make: Callable[[], tfds.core.DatasetBuilder], name: str,
                  data_dir: str | None) -> tfds.core.DatasetBuilder:
  """`make()`, or a FashionMnistUnavailableError saying which prepared copy to delete.

  Building a builder reads the metadata of a prepared copy, if any; a corrupt copy fails there
  with whatever its parser raises (JSON, protobuf, OS errors).
  """
  try:
    return make()
  except Exception as e:  # pylint: disable=broad-except
    folder = os.path.join(data_dir or tfds.core.constants.DATA_DIR, name)
    raise FashionMnistUnavailableError(
        f"The prepared {name} in {folder} cannot be read ({type(e).__name__}: {e}); it is corrupt "
        f"or incomplete. Delete {folder} and run again: it is prepared afresh.") from e


def _is_prepared(builder: tfds.core.DatasetBuilder) -> bool:
  # is_prepared() alone logs a warning for every version folder that does not exist.
  return builder.data_path.exists() and builder.is_prepared()


class FashionMnistNotPreparedError(FashionMnistUnavailableError):
  """get_builder(prepare=False) found no prepared copy."""


def get_builder(data_dir: str | None = None, prepare: bool = True) -> tfds.core.DatasetBuilder:
  """Returns a prepared builder with Fashion-MNIST's train and test splits.

  In order: TFDS's `fashion_mnist` already prepared in `data_dir`; our `fashion_mnist_idx`
  already prepared there; the IDX files in `data_dir` or else in DEBIAN_IDX_DIR, converted once
  into `data_dir` (TFDS's default data dir when None); TFDS's own download.

  Args:
    data_dir: TFDS data dir (None: TFDS's default); may also hold the four IDX files.
    prepare: whether this call may convert or download. Multi-process runs prepare on process 0
      only, so that no two processes write the same folder; the others pass False.

  Raises:
    FashionMnistNotPreparedError: prepare=False and no prepared copy is in data_dir.
    FashionMnistUnavailableError: none of the above worked, or a prepared copy is unreadable;
      the message says how to fix it.
    IdxFormatError: an IDX file found is corrupt; the message names it and how to replace it.
  """
  official = _open_builder(lambda: tfds.builder("fashion_mnist", data_dir=data_dir),
                           "fashion_mnist", data_dir)
  if _is_prepared(official):
    return official
  local = _open_builder(lambda: FashionMnistIdx(data_dir=data_dir), "fashion_mnist_idx", data_dir)
  if _is_prepared(local):
    return local
  if not prepare:
    raise FashionMnistNotPreparedError(
        f"Neither fashion_mnist nor fashion_mnist_idx is prepared in the TFDS data dir "
        f"{data_dir or tfds.core.constants.DATA_DIR}.")
  for folder in _idx_folders(data_dir):
    if has_idx_files(folder):
      logging.info("Preparing fashion_mnist_idx in %s from the IDX files in %s.", local.data_dir,
                   folder)
      local.download_and_prepare(download_config=tfds.download.DownloadConfig(
          manual_dir=folder, try_download_gcs=False))
      return local
  try:
    _download_and_prepare_official(official)
  except Exception as e:  # pylint: disable=broad-except
    raise FashionMnistUnavailableError(
        "fashion_mnist is not prepared in the TFDS data dir "
        f"{data_dir or '(TFDS default)'}, no IDX files were found in "
        f"{' or '.join(_idx_folders(data_dir))}, and the TFDS download failed "
        f"({type(e).__name__}: {e}). Fix it either way: (1) connect to the internet so TFDS can "
        "download fashion_mnist; or (2) `apt-get install dataset-fashion-mnist` (installs the IDX "
        f"files in {DEBIAN_IDX_DIR}), or put the four IDX files "
        f"({', '.join(name for names in IDX_FILES.values() for name in names)}) in a folder "
        "and pass `--config.data_dir=FOLDER`.") from e
  return official
