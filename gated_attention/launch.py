"""Runs one command as N local processes of a jax.distributed job: for tests, and for users'
single-box multi-process runs. Each process's output is prefixed with its rank; if one fails,
the others are stopped; SIGTERM or Ctrl-C to the launcher is passed on to every process as
SIGTERM (a preemption: each saves and stops)."""

import os
import signal
import socket
import subprocess
import sys
import threading
import time


FAILURE_GRACE_S = 3.0  # After one process fails, the others' time to exit on SIGTERM.


def free_port() -> int:
  with socket.socket() as sock:
    sock.bind(('127.0.0.1', 0))
    return sock.getsockname()[1]


def cpu_devices_env(devices: int) -> dict:
  """The environment variables that give a new process `devices` virtual CPU devices; the
  XLA_FLAGS already set are kept (the device count goes last, and XLA's last flag wins)."""
  flags = os.environ.get('XLA_FLAGS', '')
  return {'JAX_PLATFORMS': 'cpu',
          'XLA_FLAGS': f'{flags} --xla_force_host_platform_device_count={devices}'.strip()}


def _relay(rank: int, stream) -> None:
  for line in iter(stream.readline, ''):
    sys.stdout.write(f'[{rank}] {line}')
    sys.stdout.flush()


def launch_local(module: str, args: list[str], num_processes: int,
                 devices_per_process: int | None = None, grace_s: float = 30.0) -> int:
  """Runs `python -m module args` as num_processes processes; returns the job's exit status
  (0 when all succeed, else the first failure's)."""
  address = f'127.0.0.1:{free_port()}'
  processes = []
  for rank in range(num_processes):
    env = dict(os.environ, JAX_COORDINATOR_ADDRESS=address, JAX_NUM_PROCESSES=str(num_processes),
               JAX_PROCESS_ID=str(rank), PYTHONUNBUFFERED='1')
    if devices_per_process:
      env.update(cpu_devices_env(devices_per_process))
    process = subprocess.Popen([sys.executable, '-m', module, *args], env=env, text=True,
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    threading.Thread(target=_relay, args=(rank, process.stdout), daemon=True).start()
    processes.append(process)

  def forward(signum, frame):
    """Passes SIGTERM, and Ctrl-C as SIGTERM, to every process: each saves and stops."""
    del signum, frame
    for process in processes:
      if process.poll() is None:
        process.send_signal(signal.SIGTERM)
  previous = {signum: signal.signal(signum, forward) for signum in (signal.SIGTERM, signal.SIGINT)}

  try:
    while True:
      codes = [process.poll() for process in processes]
      failed = [(rank, code) for rank, code in enumerate(codes) if code not in (None, 0)]
      if failed or all(code == 0 for code in codes):
        break
      time.sleep(0.2)
    if failed:
      rank, code = failed[0]
      print(f'launch_local: process {rank} exited with status {code}; stopping the others',
            file=sys.stderr, flush=True)
      # Without that process the others can neither step nor save together: no grace to wait.
      _stop(processes, FAILURE_GRACE_S)
      return code
    return 0
  finally:
    for signum, handler in previous.items():
      signal.signal(signum, handler)
    _stop(processes, grace_s)


def _stop(processes, grace_s: float) -> None:
  """SIGTERM every live process, then SIGKILL whatever is left after grace_s."""
  for process in processes:
    if process.poll() is None:
      process.terminate()
  deadline = time.monotonic() + grace_s
  for process in processes:
    try:
      process.wait(timeout=max(deadline - time.monotonic(), 0.1))
    except subprocess.TimeoutExpired:
      process.kill()
      process.wait()
