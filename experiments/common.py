"""What every command-line main shares: known errors become one clear line and exit status 1."""

import sys

from absl import flags, logging

from gated_attention.checkpoint import CheckpointError
from gated_attention.config import ConfigError
from gated_attention.data import DataError
from gated_attention.train import TrainingError

KNOWN_ERRORS = (ConfigError, DataError, CheckpointError, TrainingError)


def run_cleanly(job):
  """Runs job(); a known error prints 'error: message' (no traceback) and exits with status 1."""
  if not flags.FLAGS['verbosity'].present:
    logging.set_verbosity(logging.WARNING)  # Orbax logs every save at INFO.
  try:
    return job()
  except KNOWN_ERRORS as error:
    print(f'error: {error}', file=sys.stderr, flush=True)
    sys.exit(1)
