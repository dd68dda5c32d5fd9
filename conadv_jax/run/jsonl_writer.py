"""metrics.jsonl: the run's scalars as JSON lines, for scripts that read a run without TensorBoard.

A resume redoes the steps after its checkpoint, so it first drops their lines: every step is in
the file once, however often the run was stopped.
"""
import collections
import json
from typing import Any

from absl import logging
from clu import metric_writers
from etils import epath

from conadv_jax.run import workdir as workdirs


class JsonlWriter(metric_writers.MetricWriter):
  """metrics.jsonl: one JSON line per write_scalars call, {"step", "kind", values...}.

  Keys arrive as "<kind>/<name>" ("train/loss", "eval/top1"). On resume, lines past the restored
  step are dropped (they will be written again), so every step appears once.
  """

  def __init__(self, workdir: epath.Path, resume_step: int):
    self.path = epath.Path(workdir) / "metrics.jsonl"  # epath: also gs://.
    if not self.path.exists():
      return
    kept = []
    for line in self.path.read_text().splitlines(keepends=True):
      try:
        step = int(json.loads(line)["step"])
      except (ValueError, KeyError, TypeError):
        logging.warning("metrics.jsonl: dropped a line that is not a metrics record (cut short "
                        "by a killed run?): %r", line[:200])
        continue
      if step <= resume_step:
        kept.append(line)
    workdirs.write_atomically(self.path, "".join(kept))  # A kill here keeps the old file.

  def write_scalars(self, step: int, scalars: dict[str, Any]) -> None:
    by_kind = collections.defaultdict(dict)
    for key, value in scalars.items():
      kind, slash, name = key.partition("/")
      if not slash:  # clu's ReportProgress logs bare names (steps_per_sec, uptime).
        kind, name = "progress", key
      by_kind[kind][name] = float(value) if not isinstance(value, int) else value
    with self.path.open("a") as f:
      for kind, values in by_kind.items():
        f.write(json.dumps({"step": int(step), "kind": kind, **values}) + "\n")

  # metrics.jsonl holds scalars only; the TensorBoard writer beside it takes the rest.
  def write_summaries(self, step: int, values: Any, metadata: Any = None) -> None:
    del step, values, metadata

  def write_images(self, step: int, images: Any) -> None:
    del step, images

  def write_videos(self, step: int, videos: Any) -> None:
    del step, videos

  def write_audios(self, step: int, audios: Any, *, sample_rate: int) -> None:
    del step, audios, sample_rate

  def write_texts(self, step: int, texts: Any) -> None:
    del step, texts

  def write_histograms(self, step: int, arrays: Any, num_buckets: Any = None) -> None:
    del step, arrays, num_buckets

  def write_hparams(self, hparams: Any) -> None:
    del hparams

  def flush(self) -> None:
    pass  # Every line is written (and the file closed) when it is logged.

  def close(self) -> None:
    pass
