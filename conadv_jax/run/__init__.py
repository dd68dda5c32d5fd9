"""The run: the loop, evaluation over data, checkpoints, the workdir and config checks."""
