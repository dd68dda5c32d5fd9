"""Which config changes a resumed run may make, and the record of those it made.

A checkpoint carries the full config it was trained with. On resume every field that differs is
either refused, because the resumed steps would belong to another experiment, or accepted with
one WARNING line and appended to the run's config history (kept in every later checkpoint and in
results.json), so no result ever claims settings that did not apply to the whole run.

Refused are the fields that decide which examples make up batch t (the data order, so that
steps are neither repeated nor skipped) and those that decide what a step is. Fields that shape
the saved state (model, widths, optimizer, number of classes, ...) need no list: the restore
compares the checkpoint's arrays with the state this config builds (checkpointing.py).
"""
import dataclasses
import json
from typing import Any

import ml_collections

# Fields that decide which examples, and which pixels, batch t holds.
DATA_ORDER_FIELDS = ("dataset", "seed", "batch_size", "image_size", "augment", "cache",
                     "shuffle_buffer_size", "synthetic_num_examples", "synthetic_num_classes",
                     "aug_branch", "randaugment_num_layers", "randaugment_magnitude")
# Fields that decide what one step computes; the steps already taken used the saved values.
STEP_MEANING_FIELDS = ("method", "staleness", "model_init")
# Changing these recomputes the learning-rate schedule for the new length.
_SCHEDULE_FIELDS = ("num_epochs", "num_train_steps", "warmup_epochs", "lr_schedule",
                    "lr_decay_power", "learning_rate", "end_learning_rate")


@dataclasses.dataclass(frozen=True)
class Change:
  field: str
  saved: Any
  current: Any

  def describe(self) -> str:
    note = (" (the learning-rate schedule is recomputed with it from here on)"
            if self.field in _SCHEDULE_FIELDS else "")
    return f"{self.field}: {self.saved!r} in the checkpoint, {self.current!r} now{note}"


def flatten(config: ml_collections.ConfigDict) -> dict[str, Any]:
  """The config as {dotted.field: JSON value}, the form stored with each checkpoint."""
  flat = {}

  def visit(prefix: str, node: Any) -> None:
    for key, value in node.items():
      if isinstance(value, (dict, ml_collections.ConfigDict)):
        visit(f"{prefix}{key}.", value)
      else:
        flat[f"{prefix}{key}"] = value

  visit("", config.to_dict() if isinstance(config, ml_collections.ConfigDict) else config)
  return json.loads(json.dumps(flat, default=str))  # Tuples become lists, as when read back.


_ABSENT = "<absent>"


def compare(saved: dict[str, Any], current: dict[str, Any]) -> tuple[list[Change], list[Change]]:
  """(refused, accepted) differences between a checkpoint's flat config and the current one."""
  refused, accepted = [], []
  for field in sorted(saved.keys() | current.keys()):
    old, new = saved.get(field, _ABSENT), current.get(field, _ABSENT)
    if old == new:
      continue
    change = Change(field, old, new)
    if field in DATA_ORDER_FIELDS or field in STEP_MEANING_FIELDS:
      refused.append(change)
    else:
      accepted.append(change)
  return refused, accepted


def why_refused(change: Change) -> str:
  if change.field in DATA_ORDER_FIELDS:
    return "it decides which examples each step trains on"
  return "it decides what each step computes"


def history_entry(step: int, changes: list[Change]) -> dict[str, Any]:
  """One entry of the config history: the fields changed when resuming at `step`."""
  return {"step": step, "changes": {c.field: [c.saved, c.current] for c in changes}}
