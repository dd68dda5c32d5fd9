"""The run record: what a resume needs to know besides the state, saved with every checkpoint.

The state alone fixes the next step; the record says under which config it was trained, in which
data order, which evaluations are done, and the final eval of a finished run (so a rerun prints
the same numbers without evaluating again). It is saved as JSON beside the state. A record that
lacks a field, or has one this code does not know, is refused as a whole: guessing a default
could repeat or skip an evaluation, or resume in another data order unnoticed.
"""
import dataclasses
from typing import Any


class MalformedRecordError(ValueError):
  """A saved record is not one this code writes; the message lists what is wrong."""


@dataclasses.dataclass
class FinalEval:
  """The evaluation of a finished run's final parameters."""
  step: int
  results: dict[str, float]  # evaluate.evaluate's metrics, with robust_top1 when measured.
  sharpness: dict[str, Any] | None  # None when config.sharpness_num_examples is 0.


@dataclasses.dataclass
class RunRecord:
  """The record saved with every checkpoint; the loop updates it as the run goes on."""
  config: dict[str, Any]  # The flat config (config_history.flatten) of the latest (re)start.
  history: list[dict[str, Any]]  # config_history.history_entry per resume with changed settings.
  data_order: str | None  # order.data_order_key: None for one global order.
  last_eval_step: int | None = None  # The newest step whose periodic (or final) eval is logged.
  last_train: dict[str, float] | None = None  # The newest logged training metrics.
  final_eval: FinalEval | None = None

  def to_json(self) -> dict[str, Any]:
    """Every field, for orbax's JSON item; from_json reads it back unchanged."""
    return dataclasses.asdict(self)

  @classmethod
  def from_json(cls, data: Any) -> "RunRecord":
    """The record saved by to_json.

    Raises:
      MalformedRecordError: `data` lacks a field, has an unknown one, or is not an object.
    """
    if not isinstance(data, dict):
      raise MalformedRecordError(f"it is a {type(data).__name__}, not an object")
    problems = _field_problems(cls, data, "")
    final = data.get("final_eval")
    if isinstance(final, dict):
      problems += _field_problems(FinalEval, final, "final_eval.")
    elif final is not None:
      problems.append(f"final_eval is a {type(final).__name__}, not an object or null")
    if problems:
      raise MalformedRecordError("; ".join(problems))
    return cls(**{**data, "final_eval": None if final is None else FinalEval(**final)})


def _field_problems(kind: type, data: dict[str, Any], prefix: str) -> list[str]:
  names = [field.name for field in dataclasses.fields(kind)]
  missing = [prefix + name for name in names if name not in data]
  unknown = sorted(prefix + str(key) for key in data if key not in names)
  return ([f"no field {', '.join(missing)}"] if missing else []) + (
      [f"unknown field {', '.join(unknown)}"] if unknown else [])
