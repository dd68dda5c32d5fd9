"""Trains and evaluates one run: python main.py --config=configs/FILE.py[:PRESET] --workdir=DIR.

Flags, process set-up and one call to the loop (conadv_jax.run.train); rerunning the same command
resumes. Every mistake a user can make ends in one `error: ...` line and exit status 2, never a
traceback (conadv_jax.run.cli).
"""
from absl import app, flags, logging
from ml_collections import config_flags

from conadv_jax.run import cli

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


def main(argv: list[str]) -> None:
  if len(argv) > 1:
    cli.user_error(f"unexpected arguments {argv[1:]}; flags take the form --name=value.")
  cli.quiet_libraries()
  # JAX and TensorFlow are imported here, not above, so that --help needs neither.
  import jax  # pylint: disable=g-import-not-at-top

  cli.initialize_distributed(
      jax, distributed=FLAGS.distributed, coordinator_address=FLAGS.coordinator_address,
      num_processes=FLAGS.num_processes, process_id=FLAGS.process_id,
      timeout_s=FLAGS.distributed_timeout)
  logging.info("Process %d of %d; %d local / %d global devices: %s", jax.process_index(),
               jax.process_count(), jax.local_device_count(), jax.device_count(),
               jax.local_devices())
  with cli.one_line_errors():
    from conadv_jax.run import preflight  # pylint: disable=g-import-not-at-top

    # Before TensorFlow is imported (seconds), so that a mistyped value fails at once.
    checked = preflight.check(FLAGS.config, FLAGS.workdir)
    import tensorflow as tf  # pylint: disable=g-import-not-at-top

    from conadv_jax.run import train  # pylint: disable=g-import-not-at-top

    tf.config.set_visible_devices([], "GPU")  # tf.data only; keep TF off the accelerators.
    results = train.run_checked(checked)
  if jax.process_index() == 0:
    cli.print_outcome(results, FLAGS.workdir)


if __name__ == "__main__":
  app.run(main, flags_parser=cli.parse_flags)
