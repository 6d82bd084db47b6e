"""What every command-line main shares: multi-process start-up, and known errors as one clear
line with exit status 1."""

import sys

from absl import flags, logging

from gated_attention.aot import CompileError
from gated_attention.checkpoint import CheckpointError
from gated_attention.config import ConfigError
from gated_attention.data import DataError
from gated_attention.distributed import initialize
from gated_attention.train import TrainingError

KNOWN_ERRORS = (ConfigError, DataError, CheckpointError, TrainingError, CompileError)

_COORDINATOR = flags.DEFINE_string(
    'coordinator_address', None,
    'host:port of process 0 for multi-process runs (default: $JAX_COORDINATOR_ADDRESS).')
_NUM_PROCESSES = flags.DEFINE_integer('num_processes', None,
                                      'Processes in the job (default: $JAX_NUM_PROCESSES).')
_PROCESS_ID = flags.DEFINE_integer('process_id', None,
                                   'This process\'s rank (default: $JAX_PROCESS_ID).')
_DISTRIBUTED = flags.DEFINE_enum(
    'distributed', 'auto', ['auto', 'on', 'off'],
    'on: call jax.distributed.initialize (on TPU pods and SLURM it finds its arguments itself); '
    'auto: only when a coordinator address or process count above 1 is given; off: never.')


def run_cleanly(job):
  """Starts the process group if asked, runs job(); a known error prints 'error: message'
  (no traceback) and exits with status 1."""
  if not flags.FLAGS['verbosity'].present:
    logging.set_verbosity(logging.WARNING)  # Orbax logs every save at INFO.
  try:
    initialize(_DISTRIBUTED.value, _COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value)
    return job()
  except KNOWN_ERRORS as error:
    print(f'error: {error}', file=sys.stderr, flush=True)
    # A failed restore leaves sibling reads failing in orbax's background coroutines; they are
    # the same error, already reported, so their teardown reports are dropped.
    sys.unraisablehook = lambda unraisable: None
    sys.exit(1)
