"""Process start-up (host memory, the TPU runtime off TPU hosts, the compilation cache, one
process per host) and preemption.

On TPU pods and SLURM clusters `jax.distributed.initialize()` finds its arguments itself; on
other machines they come from flags or the JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES /
JAX_PROCESS_ID environment variables (`experiments.launch_local` sets them for local runs).
"""

import ctypes
import math
import os
import signal
import sys
import time

import jax
from jax._src import hardware_utils  # The PCI test jax itself uses to find TPU chips.
from jax.experimental import multihost_utils

from gated_attention.config import ConfigError


# glibc's mallopt parameters (malloc.h).
_M_TRIM_THRESHOLD, _M_MMAP_MAX, _M_ARENA_MAX = -1, -4, -8

COMPILATION_CACHE_DIR = '~/.cache/gated_attention/jax'
COMPILATION_CACHE_MAX_BYTES = 4 * 2**30
_CACHE_HIT_EVENT = '/jax/compilation_cache/cache_hits'


def log(message: str) -> None:
  """Prints a line from process 0 only (every process runs the same program)."""
  if jax.process_index() == 0:
    print(message, flush=True)


def warn(message: str) -> None:
  """Prints 'warning: message' to standard error, from process 0 only."""
  if jax.process_index() == 0:
    print(f'warning: {message}', file=sys.stderr, flush=True)


def keep_freed_host_memory() -> bool:
  """Keeps freed host memory in the process for reuse: one malloc arena, no mmap for large
  blocks, trimming only past 2 GiB free. XLA:CPU allocates every buffer of a step afresh, and
  glibc serves blocks over 32 MB (all blocks over 64 MB in a thread's arena) with mmap and
  unmaps them when freed, so without this each step faults its whole working set in again
  (measured on the `small` train step: 160k page faults, 0.95 s -> 0.80 s per step).

  Takes effect only before JAX starts its backends (their threads take their own arenas), so
  every command line that runs steps on a CPU calls it first (`experiments.cli.run`). Not
  elsewhere: one arena serializes the allocations of multi-threaded compilers (libtpu compiled
  the 48-layer paper step in 51.7 s with it, 41.3 s without). Returns False where the C library
  is not glibc."""
  try:
    libc = ctypes.CDLL('libc.so.6')
  except OSError:
    return False
  return all(libc.mallopt(parameter, value) == 1 for parameter, value in (
      (_M_ARENA_MAX, 1), (_M_MMAP_MAX, 0), (_M_TRIM_THRESHOLD, 2**31 - 1)))


def steps_run_on_cpu() -> bool:
  """Whether this process's steps will run on XLA:CPU, judged before JAX starts its backends:
  JAX_PLATFORMS naming cpu first where it is set, else no TPU chip and no NVIDIA driver here."""
  platforms = os.environ.get('JAX_PLATFORMS', '')
  if platforms:
    return platforms.split(',')[0].strip() == 'cpu'
  return not tpu_chips_attached() and not os.path.exists('/dev/nvidiactl')


def tpu_chips_attached() -> bool:
  """Whether this host's PCI bus has TPU chips."""
  return hardware_utils.num_available_tpu_chips_and_device_id()[0] > 0


def quiet_tpu_runtime() -> None:
  """Gives the TPU runtime (libtpu, where installed) the host facts it asks a TPU VM for, so that
  it starts without warnings where no chip of this host will run: on CPU and GPU hosts, and for
  compile-only TPU devices."""
  os.environ.setdefault('TPU_ACCELERATOR_TYPE', 'v5litepod-4')
  os.environ.setdefault('TPU_WORKER_HOSTNAMES', 'localhost')


def use_compilation_cache() -> None:
  """Keeps compiled programs on disk, so that a relaunch with the same shapes (a resume after a
  preemption, another eval of a checkpoint) loads its steps instead of compiling them again:
  ~/.cache/gated_attention/jax, the least recently used entries dropped past 4 GiB. JAX's own
  variables take precedence: JAX_COMPILATION_CACHE_DIR moves it, JAX_COMPILATION_CACHE_MAX_SIZE
  resizes it, JAX_ENABLE_COMPILATION_CACHE=false turns it off. Call before the first compile."""
  if not jax.config.jax_compilation_cache_dir:
    jax.config.update('jax_compilation_cache_dir', os.path.expanduser(COMPILATION_CACHE_DIR))
  if 'JAX_COMPILATION_CACHE_MAX_SIZE' not in os.environ:
    jax.config.update('jax_compilation_cache_max_size', COMPILATION_CACHE_MAX_BYTES)


class CompileTimer:
  """Times the compiles inside `with CompileTimer() as timer:`. `timer.seconds`; str(timer)
  says how long and whether the compilation cache served them ('loaded from the compilation
  cache in 0.7s') or XLA compiled them ('compiled in 3.5s')."""

  def __enter__(self):
    self.cache_hits, self.seconds = 0, None
    jax.monitoring.register_event_listener(self._on_event)
    self.started = time.perf_counter()
    return self

  def _on_event(self, event: str, **kwargs):
    del kwargs
    self.cache_hits += event == _CACHE_HIT_EVENT

  def __exit__(self, *exception):
    self.seconds = time.perf_counter() - self.started
    jax.monitoring.unregister_event_listener(self._on_event)

  def __str__(self):
    how = 'loaded from the compilation cache' if self.cache_hits else 'compiled'
    return f'{how} in {self.seconds:.1f}s'


def _env_int(name: str) -> int | None:
  """The integer in environment variable `name`, or None if it is unset."""
  if name not in os.environ:
    return None
  try:
    return int(os.environ[name])
  except ValueError:
    raise ConfigError(f'{name}={os.environ[name]!r} must be an integer.') from None


def initialize(mode: str, coordinator_address: str | None, num_processes: int | None,
               process_id: int | None) -> None:
  """Calls jax.distributed.initialize when mode is 'on', or 'auto' with a multi-process setting;
  a malformed setting (flag or environment variable) is a ConfigError naming it."""
  coordinator_address = coordinator_address or os.environ.get('JAX_COORDINATOR_ADDRESS')
  if num_processes is None:
    num_processes = _env_int('JAX_NUM_PROCESSES')
  if process_id is None:
    process_id = _env_int('JAX_PROCESS_ID')
  if num_processes is not None and num_processes < 1:
    raise ConfigError(f'The process count (--num_processes or JAX_NUM_PROCESSES) is '
                      f'{num_processes}; it must be at least 1.')
  if process_id is not None and (process_id < 0 or process_id >= (num_processes or math.inf)):
    raise ConfigError(f'The process id (--process_id or JAX_PROCESS_ID) is {process_id}; it '
                      f'must be in [0, {num_processes or "the process count"}).')
  if mode == 'off' or (mode == 'auto' and not coordinator_address and (num_processes or 1) <= 1):
    return
  if coordinator_address:
    host, _, port = coordinator_address.rpartition(':')
    if not host or not port.isdigit():
      raise ConfigError(f'The coordinator address (--coordinator_address or '
                        f'JAX_COORDINATOR_ADDRESS) is {coordinator_address!r}; expected '
                        'HOST:PORT.')
    if num_processes is None or process_id is None:
      raise ConfigError(f'--coordinator_address={coordinator_address} also needs '
                        '--num_processes and --process_id (or JAX_NUM_PROCESSES and '
                        'JAX_PROCESS_ID).')
  if coordinator_address and jax.config.jax_platforms in (None, '', 'cpu'):
    # Cross-process collectives on CPU devices (tests, single-box runs) go over gloo.
    jax.config.update('jax_cpu_collectives_implementation', 'gloo')
  jax.distributed.initialize(coordinator_address, num_processes, process_id)


class PreemptionWatch:
  """Tells the loop when to save and stop: after SIGTERM (a preemption notice) or Ctrl-C
  (SIGINT). A second Ctrl-C exits at once, without saving: the last complete checkpoint stays.
  Watching starts with the run: a SIGTERM while it starts stops it after its first step; a
  Ctrl-C before `stepping` is set raises KeyboardInterrupt, as it would unwatched.

  With several processes jax's preemption service agrees on one step for all of them (every
  process must call `reached` at every step); Ctrl-C is passed to it as SIGTERM. A single
  process watches the signals itself.
  """

  def __init__(self):
    self.multi_process = jax.process_count() > 1
    self.received: str | None = None
    self.stepping = False  # Before the first step, Ctrl-C aborts as usual: nothing to save.
    signals = (signal.SIGINT,) if self.multi_process else (signal.SIGINT, signal.SIGTERM)
    self.previous = {signum: signal.signal(signum, self._on_signal) for signum in signals}

  def _on_signal(self, signum, frame):
    del frame
    if signum == signal.SIGINT and not self.stepping:
      raise KeyboardInterrupt
    if signum == signal.SIGINT and self.received == 'SIGINT':
      print('\ninterrupted again (SIGINT): exiting now without saving; the last complete '
            'checkpoint is kept', file=sys.stderr, flush=True)
      os._exit(130)
    self.received = signal.Signals(signum).name
    if self.multi_process:
      os.kill(os.getpid(), signal.SIGTERM)  # jax's preemption service listens for SIGTERM.

  def reached(self, step: int) -> bool:
    if self.multi_process:
      return multihost_utils.reached_preemption_sync_point(step)
    return self.received is not None

  def describe(self) -> str:
    """How the run was stopped, for its last line."""
    return 'interrupted (SIGINT)' if self.received == 'SIGINT' else 'preempted (SIGTERM)'

  def close(self) -> None:
    for signum, previous in self.previous.items():
      signal.signal(signum, previous)
