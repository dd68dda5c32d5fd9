"""The run's workdir: checked before anything runs, and its small files written atomically.

A run writes config.json, results.json, metrics.jsonl and run.lock beside its checkpoints; a
kill at any moment must leave each of them whole (the old or the new text), or a restart would
read an empty file. The lock that keeps a second run out is in lock.py.
"""
import os
import socket
import uuid

from etils import epath

from conadv_jax import errors


class WorkdirError(errors.UserError):
  """The workdir cannot be used (empty, a file, not writable, or held by another run)."""


def prepare(workdir: str) -> epath.Path:
  """Creates `workdir` if needed and checks that every process can write there."""
  return errors.stop_together(lambda: _prepare(workdir), "checking --workdir")


def _prepare(workdir: str) -> epath.Path:
  if not workdir or not str(workdir).strip():
    raise WorkdirError("--workdir is empty; pass the folder for checkpoints and results, e.g. "
                       "--workdir=/tmp/my_run (rerun the same command to resume).")
  path = epath.Path(workdir)
  if path.exists() and not path.is_dir():
    raise WorkdirError(f"--workdir={workdir} is a file, not a folder; pass a folder path.")
  try:
    path.mkdir(parents=True, exist_ok=True)
    probe = path / f".write_probe.{socket.gethostname()}.{os.getpid()}.{uuid.uuid4().hex[:8]}"
    probe.write_text("")
    probe.unlink()
  except OSError as e:
    raise WorkdirError(f"--workdir={workdir} cannot be written ({type(e).__name__}: {e}); "
                       "pass a folder you can write to.") from e
  return path


def is_local(path: epath.Path) -> bool:
  """False for object stores (gs://...): no rename, no kernel locks, whole-object writes."""
  return "://" not in str(path)


def unlink_quietly(name: str) -> None:
  """Removes a temporary file if it is there; a cleanup must not mask the error it follows."""
  try:
    os.unlink(name)
  except OSError:
    pass


def write_temporary(path: epath.Path, text: str) -> str:
  """Writes `text` to a new, uniquely named sibling of `path` (flushed to disk); its name."""
  tmp = str(epath.Path(path).parent / f".{epath.Path(path).name}.{uuid.uuid4().hex}.tmp")
  fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
  try:
    with os.fdopen(fd, "w") as f:
      f.write(text)
      f.flush()
      os.fsync(f.fileno())
  except BaseException:
    unlink_quietly(tmp)
    raise
  return tmp


def write_atomically(path: epath.Path, text: str) -> None:
  """Replaces `path` by `text` so that a reader, or a kill midway, sees the old or the new file.

  A plain write truncates first: SIGKILL or preemption between the truncation and the write
  leaves an empty results.json, metrics.jsonl or run.lock behind.
  """
  path = epath.Path(path)
  if not is_local(path):  # Object stores (gs://) replace whole objects already.
    path.write_text(text)
    return
  tmp = write_temporary(path, text)
  try:
    os.replace(tmp, path)
  except BaseException:
    unlink_quietly(tmp)
    raise
