"""Entry point: python main.py --config=configs/<file>.py[:preset] --workdir=DIR [--config.x=y].

Thin on purpose: flags, logging and process setup here; everything else in conadv_jax.run.train.
Every mistake a user can make (flags, config file, config values, workdir, data, checkpoints of
another experiment) ends in one `error: ...` line and exit status 2, never a traceback.
"""
import functools
import os
import socket
import sys
import threading
import traceback

from absl import app, flags, logging
from ml_collections import config_flags

FLAGS = flags.FLAGS
flags.DEFINE_string("workdir", None, "Checkpoints, metrics and results go here; rerun to resume.")
config_flags.DEFINE_config_file("config", None, "Config file, optionally with ':preset'.",
                                lock_config=True)
flags.DEFINE_bool("distributed", False,
                  "Initialise jax.distributed from the environment (Cloud TPU pods, SLURM).")
flags.DEFINE_string("coordinator_address", None,
                    "HOST:PORT of process 0, for an explicit multi-process launch.")
flags.DEFINE_integer("num_processes", None, "Processes in an explicit multi-process launch.")
flags.DEFINE_integer("process_id", None, "This process's index in an explicit launch.")
flags.DEFINE_integer("distributed_timeout", 120,
                     "Seconds to wait for every process of a multi-process run to join.")
flags.mark_flags_as_required(["config", "workdir"])


def _user_error(message: str, exit_at_once: bool = False) -> None:
  """A mistake in the command, the setup or the config: the message, no traceback, status 2.

  `exit_at_once` ends the process even from a thread other than the main one.
  """
  logging.error("%s", message)
  print(f"error: {message}", file=sys.stderr, flush=True)
  if exit_at_once:
    logging.flush()
    os._exit(2)
  sys.exit(2)


def _parse_flags(argv: list[str]) -> list[str]:
  """absl's parsing, with config-file and flag mistakes turned into one error line."""
  try:
    argv = FLAGS(argv)
    FLAGS.config.keys()  # A config file that failed to load raises only when first read.
    return argv
  except Exception as e:  # pylint: disable=broad-except
    _user_error(f"{_describe_parse_error(e)} Usage: python main.py "
                "--config=configs/FILE.py[:PRESET] --workdir=DIR [--config.FIELD=VALUE ...]")
  return []


def _describe_parse_error(error: Exception) -> str:
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
            and not f.filename.endswith("main.py")][:1]
  if isinstance(root, SyntaxError) and root.filename:
    where = f" ({root.filename}, line {root.lineno})"
  elif frames:
    where = f" ({frames[-1].filename}, line {frames[-1].lineno})"
  lines = [line for line in str(root).splitlines()
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


def _check_port_free(address: str) -> None:
  host, _, port = address.rpartition(":")
  if not port.isdigit():
    _user_error(f"--coordinator_address={address} is not HOST:PORT.")
  with socket.socket() as s:
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
      s.bind(("", int(port)))
    except OSError as e:
      _user_error(f"--coordinator_address={address}: port {port} on {host or 'this host'} is "
                  f"already in use ({e.strerror}); process 0 runs the coordinator there. Pick a "
                  "free port for every process, or stop the program holding it.")


def _join_within_timeout(initialize, failure: str) -> None:
  """Runs jax.distributed's `initialize`, ending the process with `failure` if it hangs.

  JAX's own timeout ends in a C++ check failure (an abort, after a long wait, with a message
  about a dead task), so a watchdog thread gives up first, with the fix in one line.
  """
  joined = threading.Event()

  def watchdog():
    if not joined.wait(FLAGS.distributed_timeout):
      # The main thread is blocked inside JAX; only an immediate exit can end it.
      _user_error(failure, exit_at_once=True)

  threading.Thread(target=watchdog, daemon=True).start()
  initialize(initialization_timeout=FLAGS.distributed_timeout + 60)
  joined.set()


def _initialize_distributed(jax) -> None:
  """Joins a multi-process run: explicitly (flags) or as the environment says (--distributed)."""
  explicit = (FLAGS.coordinator_address, FLAGS.num_processes, FLAGS.process_id)
  if any(x is not None for x in explicit):
    if any(x is None for x in explicit):
      _user_error("--coordinator_address, --num_processes and --process_id go together.")
    if not 0 <= FLAGS.process_id < FLAGS.num_processes:
      _user_error(f"--process_id={FLAGS.process_id} must be in [0, --num_processes="
                  f"{FLAGS.num_processes}).")
    if FLAGS.process_id == 0:
      _check_port_free(FLAGS.coordinator_address)
    # Cross-process collectives between CPU devices need gloo; GPUs and TPUs ignore this.
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    _join_within_timeout(
        functools.partial(jax.distributed.initialize, FLAGS.coordinator_address,
                          FLAGS.num_processes, FLAGS.process_id),
        f"process {FLAGS.process_id}: not all {FLAGS.num_processes} processes joined the "
        f"coordinator at {FLAGS.coordinator_address} within --distributed_timeout="
        f"{FLAGS.distributed_timeout} s. Start every process with the same "
        "--coordinator_address and --num_processes and a distinct --process_id "
        f"(0..{FLAGS.num_processes - 1}), check that every host can reach that address, or "
        "raise --distributed_timeout.")
  elif FLAGS.distributed:
    _join_within_timeout(
        jax.distributed.initialize,
        f"--distributed: not every process of the job joined within --distributed_timeout="
        f"{FLAGS.distributed_timeout} s. Start main.py on every host of the job (the same "
        "command everywhere), or raise --distributed_timeout.")


class _QuietLibraries:
  """Keeps orbax's log readable: drops its per-save INFO chatter and the tracebacks of its
  background threads (a failed save is reported once, as a CheckpointSaveError)."""

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


def _quiet_closed_loop_errors(default_hook=sys.unraisablehook):
  """An unraisable-exception hook that puts 'Event loop is closed' errors on one line.

  After a failed save, tensorstore completes orbax's write futures on an event loop orbax has
  already closed; each failed callback is reported as an unraisable exception with a full
  traceback. The save failure itself is reported once, as a CheckpointSaveError. Every other
  unraisable exception keeps its traceback.
  """

  reported = False

  def hook(unraisable):
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


def main(argv):
  if len(argv) > 1:
    _user_error(f"unexpected arguments {argv[1:]}; flags take the form --name=value.")
  logging.get_absl_handler().python_handler.addFilter(_QuietLibraries())
  sys.unraisablehook = _quiet_closed_loop_errors()
  # Imported here so --help works without initialising JAX or TensorFlow.
  import jax

  from conadv_jax import errors
  from conadv_jax.run import config_validation

  _initialize_distributed(jax)
  logging.info("Process %d of %d; %d local / %d global devices: %s", jax.process_index(),
               jax.process_count(), jax.local_device_count(), jax.device_count(),
               jax.local_devices())
  try:
    # Before TensorFlow is imported (seconds), so that a mistyped value fails at once.
    config_validation.validate(FLAGS.config, num_devices=jax.device_count())
    config_validation.check_same_on_all_processes(FLAGS.config)
    from conadv_jax.run import workdir  # pylint: disable=g-import-not-at-top
    workdir.prepare(FLAGS.workdir)
    import tensorflow as tf  # pylint: disable=g-import-not-at-top

    from conadv_jax.run import train  # pylint: disable=g-import-not-at-top

    tf.config.set_visible_devices([], "GPU")  # tf.data only; keep TF off the accelerators.
    results = train.train_and_evaluate(FLAGS.config, FLAGS.workdir)
  except errors.UserError as e:
    _user_error(str(e))
  if jax.process_index() == 0:
    if "stopped_at_step" in results:
      print(f"Stopped at step {results['stopped_at_step']} ({results['reason']}); run the same "
            "command to resume.")
    else:
      ev = results["eval"]
      print(f"Final test top-1 {ev['top1']:.4f}" +
            (f", adversarial top-1 {ev['adv_top1']:.4f}" if "adv_top1" in ev else "") +
            f" on {ev['num_examples']} examples after {results['final_step']} steps "
            f"({results['wall_time_s']:.0f} s); details in "
            f"{os.path.join(FLAGS.workdir, 'results.json')}")


if __name__ == "__main__":
  app.run(main, flags_parser=_parse_flags)
