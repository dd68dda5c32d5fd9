"""docs/study.md and README's study table say what docs/study/summary.csv says.

Every number of the study's tables is recomputed here from the committed CSVs (mean ± sample std
over seeds, paired per-seed differences, the LR tuning grid), so an edit of the docs that drifts
from the data, or new data without the docs, fails. Reads files only; runs nothing.
"""
import ast
import csv
import pathlib
import re
import statistics

import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]
STUDY = REPO / "docs" / "study"
STUDY_MD = REPO / "docs" / "study.md"
README = REPO / "README.md"

BATCH_LABELS = {256: "256", 1024: "1K", 4096: "4K", 16384: "16K"}
# (method, staleness) -> the docs' name.
METHODS = {("vanilla", 0): "vanilla", ("disadv", 0): "DisAdv", ("conadv", 1): "ConAdv τ=1",
           ("conadv", 2): "ConAdv τ=2"}
SEEDS = (0, 1, 2)
# results.json's train top-1 window at each batch size: train.py closes the logging window every
# log_every_steps (16,384 / B) steps and at every checkpoint save, which at 256 and 1K falls 6 and
# 9 steps before the end (docs/study.md, Limits).
TRAIN_WINDOW_EXAMPLES = {256: 1_536, 1024: 9_216, 4096: 16_384, 16384: 16_384}


def _read_csv(path: pathlib.Path) -> list[dict[str, str]]:
  with path.open() as f:
    return list(csv.DictReader(f))


@pytest.fixture(scope="module")
def runs() -> dict[tuple[int, str, int], dict[str, str]]:
  """{(batch, method name, seed): summary row} of the 48 study runs."""
  rows = _read_csv(STUDY / "summary.csv")
  by_key = {(int(r["batch"]), METHODS[r["method"], int(r["staleness"])], int(r["seed"])): r
            for r in rows}
  assert len(rows) == len(by_key) == 48
  assert {r["status"] for r in rows} == {"finished"}
  assert {k[2] for k in by_key} == set(SEEDS)
  return by_key


def _values(runs, batch: int, method: str, column: str) -> list[float]:
  return [float(runs[batch, method, seed][column]) for seed in SEEDS]


def _mean_std(values: list[float], scale: float, digits: int) -> str:
  return (f"{statistics.fmean(values) * scale:.{digits}f} ± "
          f"{statistics.stdev(values) * scale:.{digits}f}")


def _signed(points: float) -> str:
  return f"{points:+.2f}".replace("-", "−")


def _table_rows(text: str, num_cells: int) -> list[list[str]]:
  """The cells of every markdown table row with `num_cells` cells."""
  rows = []
  for line in text.splitlines():
    if line.startswith("|") and line.endswith("|") and not line.startswith("|---"):
      cells = [c.strip() for c in line.strip("|").split("|")]
      if len(cells) == num_cells:
        rows.append(cells)
  return rows


def _expected_results_table(runs) -> dict[tuple[str, str], list[str]]:
  expected = {}
  for batch, batch_label in BATCH_LABELS.items():
    for method in METHODS.values():
      cells = [_mean_std(_values(runs, batch, method, column), 100.0, 2)
               for column in ("test_top1", "train_top1", "gap", "robust_top1")]
      cells.append(_mean_std(_values(runs, batch, method, "sharpness"), 1.0, 1))
      cells.append(f"{statistics.fmean(_values(runs, batch, method, 'step_time_s')):.3f}")
      expected[batch_label, method] = cells
  return expected


def test_study_results_table_is_the_csv_s_mean_and_std(runs):
  expected = _expected_results_table(runs)
  found = {(row[0], row[1]): row[2:] for row in _table_rows(STUDY_MD.read_text(), 8)
           if row[1] in METHODS.values()}
  assert set(found) == set(expected)
  for key, cells in expected.items():
    assert found[key] == cells, key


def test_study_paired_differences_are_the_csv_s(runs):
  """Test top-1 of each adversarial method minus vanilla's, seed by seed, in points."""
  rows = [row for row in _table_rows(STUDY_MD.read_text(), 4)
          if row[0] in BATCH_LABELS.values() and "/" in row[1]]
  found = {row[0]: row[1:] for row in rows}
  assert len(rows) == len(found) == 4
  for batch, batch_label in BATCH_LABELS.items():
    vanilla = _values(runs, batch, "vanilla", "test_top1")
    expected = [" / ".join(_signed((a - v) * 100) for a, v in
                           zip(_values(runs, batch, method, "test_top1"), vanilla))
                for method in ("DisAdv", "ConAdv τ=1", "ConAdv τ=2")]
    assert found[batch_label] == expected, batch_label


def _eigenvalue_side(text: str, values: list[float]) -> None:
  """'mean' to one decimal, or 'mean ± std'."""
  if "±" in text:
    assert text == _mean_std(values, 1.0, 1)
  else:
    assert text == f"{statistics.fmean(values):.1f}"


def test_readme_study_table_is_the_csv_s_mean_and_std(runs):
  rows = [row for row in _table_rows(README.read_text(), 6) if row[0] in BATCH_LABELS.values()]
  found = {row[0]: row[1:] for row in rows}
  assert len(rows) == len(found) == 4
  for batch, batch_label in BATCH_LABELS.items():
    cells = found[batch_label]
    expected = [_mean_std(_values(runs, batch, method, "test_top1"), 100.0, 2)
                for method in METHODS.values()]
    assert cells[:4] == expected, batch_label
    vanilla, conadv = (side.strip() for side in cells[4].split("→"))
    _eigenvalue_side(vanilla, _values(runs, batch, "vanilla", "sharpness"))
    _eigenvalue_side(conadv, _values(runs, batch, "ConAdv τ=1", "sharpness"))


def test_table_md_is_what_plot_py_writes():
  # test_plot's copy of scripts/plot.py: loading it a second time would define its absl flags
  # twice in one pytest worker.
  from test_plot import plot  # pylint: disable=g-import-not-at-top
  rows = plot.read_summary(STUDY / "summary.csv")
  assert (STUDY / "table.md").read_text() == plot.table(rows)


def test_train_top1_counts_the_examples_the_docs_say(runs):
  """Each train top-1 is a count of correct examples over the stated window: times the window
  size it is a whole number. At 256 and 1K the window is not 16,384 examples."""
  for batch, examples in TRAIN_WINDOW_EXAMPLES.items():
    for method in METHODS.values():
      for value in _values(runs, batch, method, "train_top1"):
        assert value * examples == pytest.approx(round(value * examples), abs=1e-3)
    if examples != 16_384:
      counts = [v * 16_384 for m in METHODS.values() for v in _values(runs, batch, m, "train_top1")]
      assert any(abs(c - round(c)) > 1e-3 for c in counts), batch
  text = STUDY_MD.read_text()
  assert "about 16,384" not in text
  for examples in ("1,536", "9,216"):
    assert examples in text


def test_lr_tuning_table_is_the_csv_s_and_its_best_is_the_lr_table():
  rows = _read_csv(STUDY / "lr_tuning_summary.csv")
  assert len(rows) == 24 and {r["status"] for r in rows} == {"finished"}
  found = {row[0]: row[1:] for row in _table_rows(STUDY_MD.read_text(), 4)
           if row[0].isdigit() and "→" in row[2]}
  best = {}
  for batch in sorted({int(r["batch"]) for r in rows}):
    grid = sorted((float(r["learning_rate"]), float(r["test_top1"]), float(r["train_top1"]),
                   r["steps"]) for r in rows if int(r["batch"]) == batch)
    steps, = {g[3] for g in grid}
    cells = ", ".join(f"{lr:g} → {test * 100:.2f} ({train * 100:.2f})"
                      for lr, test, train, _ in grid)
    lr, test = max(((lr, test) for lr, test, _, _ in grid), key=lambda x: x[1])
    best[batch] = lr
    assert found[str(batch)] == [steps, cells, f"**{lr:g}** ({test * 100:.2f} %)"], batch
  table = re.search(r"LR_TABLE = (\{[^}]*\})", STUDY_MD.read_text()).group(1)
  assert ast.literal_eval(table) == best
