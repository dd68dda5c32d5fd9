"""Entry point: python main.py --config=configs/<file>.py[:preset] --workdir=DIR [--config.x=y].

Thin on purpose: flags, logging and process setup here; everything else in conadv_jax.train.
"""
import sys

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
flags.mark_flags_as_required(["config", "workdir"])


def _initialize_distributed(jax) -> None:
  """Joins a multi-process run: explicitly (flags) or as the environment says (--distributed)."""
  explicit = (FLAGS.coordinator_address, FLAGS.num_processes, FLAGS.process_id)
  if any(x is not None for x in explicit):
    if any(x is None for x in explicit):
      raise app.UsageError("--coordinator_address, --num_processes and --process_id go together.")
    # Cross-process collectives between CPU devices need gloo; GPUs and TPUs ignore this.
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(FLAGS.coordinator_address, FLAGS.num_processes, FLAGS.process_id)
  elif FLAGS.distributed:
    jax.distributed.initialize()


class _QuietLibraries:
  """Drops INFO records of orbax, whose per-save chatter would bury the training log."""

  def filter(self, record) -> bool:
    # levelno is a Python logging level; absl's logging.INFO is 0, not 20.
    return record.levelno > logging.converter.STANDARD_INFO or "/orbax/" not in record.pathname


def _user_error(e: Exception) -> None:
  """A mistake in the command, the setup or the hyperparameters: the message, no traceback,
  exit status 2."""
  logging.error("%s", e)
  print(f"error: {e}", file=sys.stderr)
  sys.exit(2)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  logging.get_absl_handler().python_handler.addFilter(_QuietLibraries())
  # Imported here so --help works without initialising JAX or TensorFlow.
  import jax

  from conadv_jax import config_validation

  _initialize_distributed(jax)
  logging.info("Process %d of %d; %d local / %d global devices: %s", jax.process_index(),
               jax.process_count(), jax.local_device_count(), jax.device_count(),
               jax.local_devices())
  try:
    # Before TensorFlow is imported (seconds), so that a mistyped flag fails at once.
    config_validation.validate(FLAGS.config, num_devices=jax.device_count())
  except config_validation.ConfigError as e:
    _user_error(e)
  import tensorflow as tf

  from conadv_jax import checkpointing, input_pipeline, train

  tf.config.set_visible_devices([], "GPU")  # tf.data only; keep TF off the accelerators.
  try:
    results = train.train_and_evaluate(FLAGS.config, FLAGS.workdir)
  except (config_validation.ConfigError, checkpointing.CheckpointMismatchError,
          input_pipeline.DataUnavailableError, train.NonFiniteLossError) as e:
    _user_error(e)
  if jax.process_index() == 0:
    if "preempted_at_step" in results:
      print(f"Preempted at step {results['preempted_at_step']}; run the same command to resume.")
    else:
      ev = results["eval"]
      print(f"Final test top-1 {ev['top1']:.4f}" +
            (f", adversarial top-1 {ev['adv_top1']:.4f}" if "adv_top1" in ev else "") +
            f" on {ev['num_examples']} examples after {results['final_step']} steps "
            f"({results['wall_time_s']:.0f} s); details in {FLAGS.workdir}/results.json")


if __name__ == "__main__":
  app.run(main)
