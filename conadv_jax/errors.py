"""The one exception type for mistakes a user can fix: main.py prints the message, no traceback.

Every error about the command line, the config, the workdir, the data or a checkpoint that the
user must act on derives from `UserError`, so the entry point catches one type and exits with
status 2. Bugs stay ordinary exceptions with tracebacks.
"""


class UserError(Exception):
  """A mistake in the command, config, workdir or data; the message says what and how to fix."""
