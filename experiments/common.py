"""What every command-line main that uses jax shares: multi-process start-up, and every known
failure as one line `error: ...` with exit status 1."""

import contextlib
import logging as std_logging
import os
import sys
import traceback

import jax
from absl import flags, logging

from experiments.cli import fail
from gated_attention.aot import CompileError
from gated_attention.checkpoint import CheckpointError
from gated_attention.config import ConfigError, parse_arg
from gated_attention.data import DataError
from gated_attention.distributed import initialize
from gated_attention.train import TrainingError

KNOWN_ERRORS = (ConfigError, DataError, CheckpointError, TrainingError, CompileError)

_COORDINATOR = flags.DEFINE_string(
    'coordinator_address', None,
    'host:port of process 0 for multi-process runs (default: $JAX_COORDINATOR_ADDRESS).')
_NUM_PROCESSES = flags.DEFINE_integer('num_processes', None,
                                      'Processes in the job (default: $JAX_NUM_PROCESSES).',
                                      lower_bound=1)
_PROCESS_ID = flags.DEFINE_integer('process_id', None,
                                   'This process\'s rank (default: $JAX_PROCESS_ID).',
                                   lower_bound=0)
_DISTRIBUTED = flags.DEFINE_enum(
    'distributed', 'auto', ['auto', 'on', 'off'],
    'on: call jax.distributed.initialize (on TPU pods and SLURM it finds its arguments itself); '
    'auto: only when a coordinator address or process count above 1 is given; off: never.')


class HideBackgroundTracebacks(std_logging.Filter):
  """Drops reports of failures in orbax's background threads and tasks, traceback included:
  orbax's own, and asyncio's 'Task exception was never retrieved' for the reads that failed
  beside the one the main thread raised (logged whenever the tasks are collected, at exit or
  before). The main thread reports the same failure in one line, naming what it means for the
  run."""

  def filter(self, record):
    if not record.exc_info:
      return True
    trace = record.exc_info[2]
    frames = [frame.f_code.co_filename for frame, _ in traceback.walk_tb(trace)]
    return not any('/orbax/' in path for path in [record.pathname, *frames])


def _is_closed_event_loop(exc) -> bool:
  return isinstance(exc, RuntimeError) and 'Event loop is closed' in str(exc)


def _hide_closed_event_loop_reports() -> None:
  """Drops 'Event loop is closed' reports: after a failed checkpoint read, the TensorStore reads
  still in flight complete on orbax's closed loop and report it from their threads, burying the
  one-line error that describes the actual failure."""
  unraisable_hook, except_hook = sys.unraisablehook, sys.excepthook
  sys.unraisablehook = lambda report: (
      None if _is_closed_event_loop(report.exc_value) else unraisable_hook(report))
  sys.excepthook = lambda kind, exc, trace: (
      None if _is_closed_event_loop(exc) else except_hook(kind, exc, trace))


def parse_mesh(text: str):
  """The --mesh flag of an evaluation main ('data=1,fsdp=-1,...') as a mesh config; ConfigError
  naming the flag for a size that is not an integer or an unknown axis."""
  try:
    return parse_arg(text, data=1, fsdp=-1, tensor=1, expert=1)
  except ValueError as error:
    raise ConfigError(f'--mesh={text!r}: {error}') from None


def progress_to_stderr(json_output: bool):
  """A context in which printed progress goes to standard error when the output is JSON, so
  that standard output holds the JSON alone."""
  # Other processes print nothing (their standard output is /dev/null): not to standard error.
  return (contextlib.redirect_stdout(sys.stderr) if json_output and jax.process_index() == 0
          else contextlib.nullcontext())


def run_cleanly(job):
  """Starts the process group if asked, runs job() with the standard output of process 0 alone
  (errors and warnings, on standard error, come from every process); a known error, any OS
  error, and Ctrl-C outside the training loop print one line 'error: message' (no traceback)
  and exit with status 1 (130 for Ctrl-C)."""
  if not flags.FLAGS['verbosity'].present:
    logging.set_verbosity(logging.WARNING)  # Orbax logs every save at INFO.
  logging.get_absl_handler().addFilter(HideBackgroundTracebacks())
  _hide_closed_event_loop_reports()
  try:
    initialize(_DISTRIBUTED.value, _COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value)
    if jax.process_index() != 0:  # Every process runs the same job: process 0 reports it.
      sys.stdout = open(os.devnull, 'w')
    return job()
  except KNOWN_ERRORS as error:
    fail(str(error))
  except OSError as error:  # A file or directory the environment refuses, named by the error.
    fail(str(error))
  except KeyboardInterrupt:
    fail('interrupted (SIGINT); nothing was saved after the last complete checkpoint.', 130)
