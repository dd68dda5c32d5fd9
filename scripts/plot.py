r"""PNG plots and a mean ± std table from a sweep's summary.csv (scripts/sweep.py).

  python scripts/plot.py --summary=/work/study_root/summary.csv --out=docs/study

Only finished runs count. Runs are grouped by method (vanilla, disadv, conadv τ=k) and batch
size; every point is the mean over seeds with a bar of ± one standard deviation (the sample
std, n−1; none with one seed), so a difference smaller than the bars is not a difference.
Batch axes are logarithmic (base 2), since the batches of a scaling study grow geometrically.

Writes in --out:
  test_top1.png     test top-1 against batch, per method
  gap.png           train top-1 − test top-1 against batch (the generalisation gap)
  robust_top1.png   top-1 under the eval PGD (eval.robust_top1) against batch
  sharpness.png     top Hessian eigenvalue of the training loss at the final parameters
  step_time.png     seconds per training step against batch, per method
  table.md          every metric as mean ± std (n seeds) per method and batch
"""
import collections
import csv
import math
import pathlib
import statistics
from collections.abc import Iterable, Sequence

from absl import app, flags

import matplotlib

matplotlib.use("Agg")  # Files only; no display needed.
import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top,wrong-import-position
from matplotlib import ticker  # pylint: disable=g-import-not-at-top,wrong-import-position

FLAGS = flags.FLAGS
flags.DEFINE_string("summary", None, "summary.csv written by scripts/sweep.py.")
flags.DEFINE_string("out", None, "Folder for the PNGs and table.md.")

# (column, file stem, y label, as a percentage).
METRICS = (
    ("test_top1", "test_top1", "test top-1 (%)", True),
    ("gap", "gap", "train top-1 − test top-1 (points)", True),
    ("robust_top1", "robust_top1", "top-1 under eval PGD (%)", True),
    ("sharpness", "sharpness", "top Hessian eigenvalue of the train loss", False),
    ("step_time_s", "step_time", "seconds per training step", False),
)
TABLE_COLUMNS = ("test_top1", "train_top1", "gap", "robust_top1", "sharpness", "step_time_s",
                 "wall_time_s")
METHOD_ORDER = ("vanilla", "disadv", "conadv τ=1", "conadv τ=2")


def method_label(method: str, staleness: int) -> str:
  return f"{method} τ={staleness}" if method == "conadv" else method


def _float(text: str) -> float | None:
  try:
    value = float(text)
  except (TypeError, ValueError):
    return None
  return value if math.isfinite(value) else None


def read_summary(path: pathlib.Path) -> list[dict[str, str]]:
  """The finished rows of a summary.csv."""
  with path.open() as f:
    return [row for row in csv.DictReader(f) if row.get("status", "finished") == "finished"]


def group(rows: Iterable[dict[str, str]],
          column: str) -> dict[str, dict[int, list[float]]]:
  """{method label: {batch: [values over seeds]}}, missing values left out."""
  groups = collections.defaultdict(lambda: collections.defaultdict(list))
  for row in rows:
    value = _float(row.get(column))
    if value is None:
      continue
    label = method_label(row["method"], int(row["staleness"]))
    groups[label][int(row["batch"])].append(value)
  return groups


def mean_std(values: Sequence[float]) -> tuple[float, float]:
  return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def _ordered(labels: Iterable[str]) -> list[str]:
  return sorted(labels, key=lambda l: (METHOD_ORDER.index(l) if l in METHOD_ORDER else 99, l))


def plot_metric(rows: list[dict[str, str]], column: str, ylabel: str, percent: bool,
                path: pathlib.Path, log_y: bool = False) -> None:
  """One line per method: mean ± std over seeds against batch, batch axis in powers of 2."""
  groups = group(rows, column)
  fig, ax = plt.subplots(figsize=(6.4, 4.2), dpi=120)
  batches = sorted({b for by_batch in groups.values() for b in by_batch})
  scale = 100.0 if percent else 1.0
  for index, label in enumerate(_ordered(groups)):
    by_batch = groups[label]
    xs = sorted(by_batch)
    stats = [mean_std(by_batch[x]) for x in xs]
    # A small horizontal offset per method keeps overlapping error bars readable.
    shift = 2 ** (0.04 * (index - (len(groups) - 1) / 2))
    ax.errorbar([x * shift for x in xs], [m * scale for m, _ in stats],
                yerr=[s * scale for _, s in stats], marker="o", capsize=3, label=label)
  if not groups:
    ax.text(0.5, 0.5, f"no values of {column} in the summary", ha="center", va="center",
            transform=ax.transAxes)
  ax.set_xscale("log", base=2)
  if batches:
    ax.set_xticks(batches)
    ax.xaxis.set_major_formatter(ticker.FuncFormatter(
        lambda x, _: f"{x / 1024:g}K" if x >= 1024 else f"{x:g}"))
    ax.xaxis.set_minor_locator(ticker.NullLocator())
  if log_y and groups:
    ax.set_yscale("log")
  ax.set_xlabel("global batch size")
  ax.set_ylabel(ylabel)
  ax.grid(True, alpha=0.3)
  if groups:
    seeds = max(len(v) for by_batch in groups.values() for v in by_batch.values())
    ax.set_title(f"mean ± std over up to {seeds} seeds", fontsize=9)
    ax.legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(path)
  plt.close(fig)


def table(rows: list[dict[str, str]]) -> str:
  """Markdown: one line per (method, batch), each metric as mean ± std (n)."""
  by_column = {column: group(rows, column) for column in TABLE_COLUMNS}
  keys = sorted({(label, batch) for groups in by_column.values()
                 for label, by_batch in groups.items() for batch in by_batch},
                key=lambda k: (k[1], _ordered([k[0], *METHOD_ORDER]).index(k[0])))
  lines = ["| batch | method | " + " | ".join(TABLE_COLUMNS) + " |",
           "|---|---|" + "---|" * len(TABLE_COLUMNS)]
  for label, batch in keys:
    cells = []
    for column in TABLE_COLUMNS:
      values = by_column[column].get(label, {}).get(batch)
      if not values:
        cells.append("—")
        continue
      mean, std = mean_std(values)
      scale, digits = ((100.0, 2) if column in ("test_top1", "train_top1", "gap", "robust_top1")
                       else (1.0, 3))
      cells.append(f"{mean * scale:.{digits}f} ± {std * scale:.{digits}f} ({len(values)})")
    lines.append(f"| {batch} | {label} | " + " | ".join(cells) + " |")
  return "\n".join(lines) + "\n"


def make_plots(summary: pathlib.Path, out: pathlib.Path) -> list[pathlib.Path]:
  """Writes the PNGs and table.md; returns their paths."""
  rows = read_summary(summary)
  out.mkdir(parents=True, exist_ok=True)
  written = []
  for column, stem, ylabel, percent in METRICS:
    path = out / f"{stem}.png"
    plot_metric(rows, column, ylabel, percent, path, log_y=column == "step_time_s")
    written.append(path)
  (out / "table.md").write_text(table(rows))
  return written + [out / "table.md"]


def main(argv: Sequence[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  if not FLAGS.summary or not FLAGS.out:
    raise app.UsageError("--summary and --out are required.")
  for path in make_plots(pathlib.Path(FLAGS.summary), pathlib.Path(FLAGS.out)):
    print(path)


if __name__ == "__main__":
  app.run(main)
