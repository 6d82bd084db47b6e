"""One writer per workdir: a run (or an ablation sweep) holds WORKDIR/lock while it writes there.

Process 0 takes an exclusive `flock` on the file and writes its holder into it (host, pid, start
time, command); a second run on the same workdir is refused in one line naming that holder.
The kernel drops the lock when its process exits, however it exits (kill -9 included), so a
lock left behind by a dead run never stands in the way: the file stays, the lock does not.
This holds on local filesystems and on NFSv4 (where Linux maps flock to a byte-range lock the
server sees); on FUSE mounts of object stores (gcsfuse) the lock holds only among processes of
one host. Evaluation takes no lock: it reads only complete checkpoints.
"""

import contextlib
import datetime
import fcntl
import json
import os
import pathlib
import socket
import sys

import jax
import numpy as np
from jax.experimental import multihost_utils

from gated_attention.checkpoint import CheckpointError

LOCK_NAME = 'lock'


def this_process() -> dict:
  """{'host', 'pid', 'time' (now, UTC), 'command'}: how the lock and the history name a run."""
  return {'host': socket.gethostname(), 'pid': os.getpid(),
          'time': datetime.datetime.now(datetime.timezone.utc).isoformat(timespec='seconds'),
          'command': ' '.join(sys.argv)}


def _describe(holder_text: str) -> str:
  try:
    holder = json.loads(holder_text)
    return (f'pid {holder["pid"]} on {holder["host"]}, started {holder["time"]}: '
            f'{holder["command"]}')
  except (json.JSONDecodeError, KeyError, TypeError):
    return 'holder unknown'


def _acquire(workdir: pathlib.Path):
  """The open lock file, locked and naming this process; CheckpointError if it cannot be."""
  try:
    workdir.mkdir(parents=True, exist_ok=True)
    lock_file = (workdir / LOCK_NAME).open('a+')
  except OSError as error:
    raise CheckpointError(f'Cannot write to the workdir {workdir} ({error.strerror}); choose a '
                          'writable --workdir.') from None
  try:
    fcntl.flock(lock_file, fcntl.LOCK_EX | fcntl.LOCK_NB)
  except BlockingIOError:
    lock_file.seek(0)
    holder = _describe(lock_file.read())
    lock_file.close()
    raise CheckpointError(f'{workdir} is in use by another run ({holder}); wait for it to end, '
                          'or use another --workdir.') from None
  lock_file.truncate(0)
  lock_file.write(json.dumps(this_process()))
  lock_file.flush()
  return lock_file


@contextlib.contextmanager
def hold(workdir):
  """Holds WORKDIR/lock (creating the workdir) for the `with` block, on process 0. Every
  process raises CheckpointError, before anything is written, if another run holds it or the
  workdir cannot be written."""
  workdir = pathlib.Path(workdir)
  lock_file, problem = None, None
  if jax.process_index() == 0:
    try:
      lock_file = _acquire(workdir)
    except CheckpointError as error:
      problem = str(error)
  if jax.process_count() > 1:  # Every process stops if process 0 could not take the lock.
    if multihost_utils.broadcast_one_to_all(np.int32(problem is not None)) and problem is None:
      problem = f'Process 0 could not take the lock on {workdir} (its error says why).'
  if problem is not None:
    raise CheckpointError(problem)
  try:
    yield
  finally:
    if lock_file is not None:
      lock_file.truncate(0)
      fcntl.flock(lock_file, fcntl.LOCK_UN)
      lock_file.close()
