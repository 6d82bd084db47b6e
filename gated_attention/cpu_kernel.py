"""The compiled CPU attention kernel (`csrc/flash_attention_cpu.cc`, behind
`model.attention_impl=cpu_flash`): built with the host's C++ compiler on first use, cached per
source, compiler, JAX version and CPU, and registered with XLA as FFI targets.

XLA:CPU runs attention's many small batched products on one core at 40-90 GFLOP/s (README,
Speed); the kernel runs each sequence's KV head as one work item on XLA's own intra-op threads,
with register-tiled products, so a CPU step keeps both cores busy through attention too.

The compiler is `$CXX`, else `c++`; the cache is `$GATED_ATTENTION_CACHE/kernels`, else
`$XDG_CACHE_HOME/gated_attention/kernels` (`~/.cache/...`). A library is written to a temporary
file and renamed into place, so processes building at once each leave a whole one."""

import ctypes
import functools
import hashlib
import os
import pathlib
import platform
import secrets
import shutil
import subprocess
import sys

import jax

from gated_attention.distributed import log

SOURCE = pathlib.Path(__file__).parent / 'csrc' / 'flash_attention_cpu.cc'
FORWARD, BACKWARD = 'gated_attention_flash_forward', 'gated_attention_flash_backward'
_SYMBOLS = {FORWARD: 'GatedAttentionFlashForward', BACKWARD: 'GatedAttentionFlashBackward'}
FLAGS = ('-O3', '-march=native', '-std=c++17', '-shared', '-fPIC')


def cache_dir() -> pathlib.Path:
  if os.environ.get('GATED_ATTENTION_CACHE'):
    return pathlib.Path(os.environ['GATED_ATTENTION_CACHE']) / 'kernels'
  base = os.environ.get('XDG_CACHE_HOME') or pathlib.Path.home() / '.cache'
  return pathlib.Path(base) / 'gated_attention' / 'kernels'


def _cpu_features() -> str:
  """The CPU's feature flags (what -march=native compiles for), so a cache shared between
  machines never hands one a library built for another's instructions."""
  try:
    lines = pathlib.Path('/proc/cpuinfo').read_text().splitlines()
  except OSError:
    return platform.processor()
  return next((line for line in lines if line.split(':')[0].strip() in ('flags', 'Features')),
              platform.processor())


def _compile(compiler: str, library: pathlib.Path) -> str | None:
  """Builds the library; returns why it could not, or None. The compiler writes a name of this
  process's own (its mode from the umask, as any build's), renamed into place when whole."""
  library.parent.mkdir(parents=True, exist_ok=True)
  partial = library.with_name(f'{library.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp')
  command = [compiler, *FLAGS, '-isystem', jax.ffi.include_dir(), str(SOURCE), '-o',
             str(partial)]
  try:
    result = subprocess.run(command, capture_output=True, text=True, timeout=600)
    if result.returncode:
      return (f'{" ".join(command)} failed (exit status {result.returncode}): '
              f'{result.stderr.strip()[-600:]}')
    os.replace(partial, library)
    return None
  except subprocess.TimeoutExpired:
    return f'{" ".join(command)} ran past 600 s'
  finally:
    partial.unlink(missing_ok=True)


@functools.cache
def build_error() -> str | None:
  """Builds (or finds in the cache) and registers the kernel; returns why it cannot run in this
  process (and says it once), or None once its FFI targets are registered."""
  error = _build_and_register()
  if error:
    log(f'the CPU attention kernel is not available: {error}. model.attention_impl=auto runs '
        'chunked instead.')
  return error


def _build_and_register() -> str | None:
  if sys.platform != 'linux':
    return f'the kernel is built on Linux only (this is {sys.platform})'
  compiler = shutil.which(os.environ.get('CXX', 'c++'))
  if compiler is None:
    return f'no C++ compiler: {os.environ.get("CXX", "c++")!r} is not on PATH (set $CXX)'
  version = subprocess.run([compiler, '--version'], capture_output=True, text=True).stdout
  key = hashlib.sha256('\n'.join([
      SOURCE.read_text(), compiler, version, ' '.join(FLAGS), jax.__version__,
      platform.machine(), _cpu_features()]).encode()).hexdigest()[:16]
  library = cache_dir() / f'flash_attention_cpu_{key}.so'
  if not library.exists():
    log(f'building the CPU attention kernel into {library} (once per machine) ...')
    try:
      error = _compile(compiler, library)
    except OSError as failure:
      error = f'cannot write {library.parent}: {failure} (set $GATED_ATTENTION_CACHE)'
    if error:
      return error
  try:
    handle = ctypes.CDLL(str(library))
  except OSError as failure:
    return f'cannot load {library}: {failure}'
  for target, symbol in _SYMBOLS.items():
    jax.ffi.register_ffi_target(target, jax.ffi.pycapsule(getattr(handle, symbol)),
                                platform='cpu')
  return None
