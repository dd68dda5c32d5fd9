"""Config files; load them with --config=configs/<file>.py[:preset]."""
