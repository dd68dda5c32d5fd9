"""What main.py needs besides its flags: one-line errors, quiet libraries, the process set-up.

Every mistake a user can make (flags, config file, config values, workdir, data, checkpoints of
another experiment) ends in one `error: ...` line and exit status 2, never a traceback; bugs keep
theirs. Imports neither JAX nor TensorFlow, so that `--help` and a mistyped flag answer at once.
"""
import contextlib
import functools
import os
import re
import socket
import sys
import threading
import traceback
from collections.abc import Callable, Iterator
from typing import Any, NoReturn

from absl import flags, logging

from conadv_jax import errors

USAGE = ("Usage: python main.py --config=configs/FILE.py[:PRESET] --workdir=DIR "
         "[--config.FIELD=VALUE ...]")


def user_error(message: str, exit_at_once: bool = False) -> NoReturn:
  """Ends the process with `error: message` and status 2, no traceback.

  `exit_at_once` ends it even from a thread other than the main one.
  """
  logging.error("%s", message)
  print(f"error: {message}", file=sys.stderr, flush=True)
  if exit_at_once:
    logging.flush()
    os._exit(2)
  sys.exit(2)


@contextlib.contextmanager
def one_line_errors() -> Iterator[None]:
  """Turns a UserError raised inside into one error line; other exceptions keep tracebacks."""
  try:
    yield
  except errors.UserError as e:
    user_error(str(e))


def parse_flags(argv: list[str]) -> list[str]:
  """absl's flag parsing (app.run's flags_parser), a mistake ending in one error line."""
  try:
    argv = flags.FLAGS(argv)
    flags.FLAGS.config.keys()  # A config file that failed to load raises only when first read.
    return argv
  except Exception as e:  # pylint: disable=broad-except
    user_error(f"{describe_parse_error(e)} {USAGE}")


def describe_parse_error(error: Exception) -> str:
  """The root cause of a flag or config-file error, with its line in the config file."""
  chain = [error]
  while chain[-1].__cause__ or chain[-1].__context__:
    chain.append(chain[-1].__cause__ or chain[-1].__context__)
  root = chain[-1]
  if isinstance(root, KeyError) and any("--config." in a for a in sys.argv):
    return (f"config.{root.args[0]} is not a field of this config (a misspelled "
            "--config.FIELD override?); see configs/default.py for the fields.")
  where = ""
  frames = [f for e in reversed(chain) for f in traceback.extract_tb(e.__traceback__)
            if f.filename.endswith(".py") and "/site-packages/" not in f.filename
            and os.path.abspath(f.filename) != os.path.abspath(__file__)][:1]
  if isinstance(root, SyntaxError) and root.filename:
    where = f" ({root.filename}, line {root.lineno})"
  elif frames:
    where = f" ({frames[-1].filename}, line {frames[-1].lineno})"
  text = str(root.args[0]) if isinstance(root, KeyError) and root.args else str(root)
  # A locked ConfigDict lists every field it has after a misspelled one: keep the fix only.
  text = re.sub(r" Other fields present: .*?(?=Did you mean|$)", " ", text, flags=re.S)
  lines = [line for line in text.splitlines()
           if line.strip() and not line.startswith(("Traceback", "  "))]
  # ml_collections puts the path of a missing config file only in an outer error's text.
  lines += [line.strip() for e in chain[:-1] for line in str(e).splitlines()
            if "[Errno" in line or line.strip().startswith("/")]
  message = " ".join(lines) or type(root).__name__
  if not isinstance(root, flags.Error):
    message = f"{type(root).__name__}: {message}"
  if root is not error and isinstance(error, flags.Error):
    message = f"{str(error).splitlines()[0].rstrip(':')}: {message}"
  return f"{message.rstrip('.')}{where}."


class _QuietLibraries:
  """A log filter that drops orbax's per-save INFO chatter and its background threads'
  tracebacks: a failed save is reported once, as a CheckpointSaveError."""

  def filter(self, record) -> bool:
    # asyncio reports orbax's failed write tasks again ("Task exception was never retrieved").
    if "/orbax/" not in record.pathname and record.name != "asyncio":
      return True
    # levelno is a Python logging level; absl's logging.INFO is 0, not 20.
    if record.levelno <= logging.converter.STANDARD_INFO:
      return False
    record.msg, record.args = record.getMessage().split("\n", 1)[0], ()
    record.exc_info, record.exc_text = None, None
    return True


def _quiet_closed_loop_errors(default_hook: Callable[[Any], None]) -> Callable[[Any], None]:
  """An unraisable-exception hook that puts 'Event loop is closed' errors on one line.

  After a failed save, tensorstore completes orbax's write futures on an event loop orbax has
  already closed; each failed callback is reported as an unraisable exception with a full
  traceback. The save failure itself is reported once, as a CheckpointSaveError. Every other
  unraisable exception keeps its traceback.
  """
  reported = False

  def hook(unraisable) -> None:
    nonlocal reported
    value = unraisable.exc_value
    if isinstance(value, RuntimeError) and str(value) == "Event loop is closed":
      if not reported:
        logging.warning("Ignoring 'Event loop is closed' errors in orbax's write callbacks "
                        "(a save failed; it is reported as an error).")
      reported = True
      return
    default_hook(unraisable)

  return hook


def quiet_libraries() -> None:
  """Keeps the log readable: orbax's chatter and its failed callbacks' tracebacks go."""
  logging.get_absl_handler().python_handler.addFilter(_QuietLibraries())
  sys.unraisablehook = _quiet_closed_loop_errors(sys.unraisablehook)


def _check_port_free(address: str) -> None:
  host, _, port = address.rpartition(":")
  if not port.isdigit():
    user_error(f"--coordinator_address={address} is not HOST:PORT.")
  with socket.socket() as s:
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
      s.bind(("", int(port)))
    except OSError as e:
      user_error(f"--coordinator_address={address}: port {port} on {host or 'this host'} is "
                 f"already in use ({e.strerror}); process 0 runs the coordinator there. Pick a "
                 "free port for every process, or stop the program holding it.")


def _join_within_timeout(initialize: Callable[..., None], timeout_s: int, failure: str) -> None:
  """Runs jax.distributed's `initialize`, ending the process with `failure` if it hangs.

  JAX's own timeout ends in a C++ check failure (an abort, after a long wait, with a message
  about a dead task), so a watchdog thread gives up first, with the fix in one line.
  """
  joined = threading.Event()

  def watchdog() -> None:
    if not joined.wait(timeout_s):
      # The main thread is blocked inside JAX; only an immediate exit can end it.
      user_error(failure, exit_at_once=True)

  threading.Thread(target=watchdog, daemon=True).start()
  initialize(initialization_timeout=timeout_s + 60)
  joined.set()


def initialize_distributed(jax: Any, *, distributed: bool, coordinator_address: str | None,
                           num_processes: int | None, process_id: int | None,
                           timeout_s: int) -> None:
  """Joins a multi-process run: explicitly (the three flags) or as the environment says.

  `jax` is passed in, imported by the caller, so that this module never imports it.
  """
  explicit = (coordinator_address, num_processes, process_id)
  if any(x is not None for x in explicit):
    if any(x is None for x in explicit):
      user_error("--coordinator_address, --num_processes and --process_id go together.")
    if not 0 <= process_id < num_processes:
      user_error(f"--process_id={process_id} must be in [0, --num_processes={num_processes}).")
    if process_id == 0:
      _check_port_free(coordinator_address)
    # Cross-process collectives between CPU devices need gloo; GPUs and TPUs ignore this.
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    _join_within_timeout(
        functools.partial(jax.distributed.initialize, coordinator_address, num_processes,
                          process_id), timeout_s,
        f"process {process_id}: not all {num_processes} processes joined the coordinator at "
        f"{coordinator_address} within --distributed_timeout={timeout_s} s. Start every "
        "process with the same --coordinator_address and --num_processes and a distinct "
        f"--process_id (0..{num_processes - 1}), check that every host can reach that address, "
        "or raise --distributed_timeout.")
  elif distributed:
    _join_within_timeout(
        jax.distributed.initialize, timeout_s,
        f"--distributed: not every process of the job joined within --distributed_timeout="
        f"{timeout_s} s. Start main.py on every host of the job (the same command everywhere), "
        "or raise --distributed_timeout.")


def print_outcome(results: dict[str, Any], workdir: str) -> None:
  """The run's outcome in one line: the final numbers, or where it stopped and how to resume."""
  if "stopped_at_step" in results:
    print(f"Stopped at step {results['stopped_at_step']} ({results['reason']}); run the same "
          "command to resume.")
    return
  ev = results["eval"]
  print(f"Final test top-1 {ev['top1']:.4f}" +
        (f", adversarial top-1 {ev['adv_top1']:.4f}" if "adv_top1" in ev else "") +
        f" on {ev['num_examples']} examples after {results['final_step']} steps "
        f"({results['wall_time_s']:.0f} s); details in {os.path.join(workdir, 'results.json')}")
