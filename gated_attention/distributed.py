"""Multi-process start-up (one process per host) and preemption.

On TPU pods and SLURM clusters `jax.distributed.initialize()` finds its arguments itself; on
other machines they come from flags or the JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES /
JAX_PROCESS_ID environment variables (`experiments.launch_local` sets them for local runs).
"""

import os
import signal

import jax
from jax.experimental import multihost_utils

from gated_attention.config import ConfigError


def initialize(mode: str, coordinator_address: str | None, num_processes: int | None,
               process_id: int | None) -> None:
  """Calls jax.distributed.initialize when mode is 'on', or 'auto' with a multi-process setting."""
  coordinator_address = coordinator_address or os.environ.get('JAX_COORDINATOR_ADDRESS')
  if num_processes is None and 'JAX_NUM_PROCESSES' in os.environ:
    num_processes = int(os.environ['JAX_NUM_PROCESSES'])
  if process_id is None and 'JAX_PROCESS_ID' in os.environ:
    process_id = int(os.environ['JAX_PROCESS_ID'])
  if mode == 'off' or (mode == 'auto' and not coordinator_address and (num_processes or 1) <= 1):
    return
  if coordinator_address and (num_processes is None or process_id is None):
    raise ConfigError(f'--coordinator_address={coordinator_address} also needs --num_processes '
                      'and --process_id (or JAX_NUM_PROCESSES and JAX_PROCESS_ID).')
  if coordinator_address and jax.config.jax_platforms in (None, '', 'cpu'):
    # Cross-process collectives on CPU devices (tests, single-box runs) go over gloo.
    jax.config.update('jax_cpu_collectives_implementation', 'gloo')
  jax.distributed.initialize(coordinator_address, num_processes, process_id)


class PreemptionWatch:
  """Tells the loop when to save and stop after SIGTERM (a preemption notice).

  With several processes jax's preemption service agrees on one step for all of them
  (every process must call `reached` at every step); a single process watches SIGTERM itself.
  """

  def __init__(self):
    self.multi_process = jax.process_count() > 1
    self.received = False
    self.previous = None
    if not self.multi_process:
      self.previous = signal.signal(signal.SIGTERM, self._on_sigterm)

  def _on_sigterm(self, signum, frame):
    del signum, frame
    self.received = True

  def reached(self, step: int) -> bool:
    if self.multi_process:
      return multihost_utils.reached_preemption_sync_point(step)
    return self.received

  def close(self) -> None:
    if self.previous is not None:
      signal.signal(signal.SIGTERM, self.previous)
