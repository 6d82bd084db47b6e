"""Scale-out and reliability with real processes: several processes, preemption, kill -9 at any
moment, a damaged checkpoint, and a checkpoint restored onto another mesh."""

import json
import os
import pathlib
import shutil
import signal
import subprocess
import sys
import time

import jax
import numpy as np

from gated_attention.checkpoint import Checkpointer, load_config
from gated_attention.metrics import read_metrics
from tests import helpers

TINY_FLAGS = {
    'model.d_model': 32, 'model.num_layers': 2, 'model.num_heads': 4, 'model.num_kv_heads': 2,
    'model.head_dim': 8, 'model.mlp_dim': 64, 'data.seq_len': 32, 'data.batch_size': 8,
    'eval.batch_size': 8, 'eval.batches': 2, 'eval.analysis_batches': 1, 'train.warmup_steps': 1,
    'train.log_every': 1,
}
REPO = pathlib.Path(__file__).resolve().parents[1]


def _command(module, workdir, steps, checkpoint_every, **flags):
  args = [f'--config.{k}={v}' for k, v in {**TINY_FLAGS, 'train.steps': steps,
                                           'train.checkpoint_every': checkpoint_every,
                                           **flags}.items()]
  return [sys.executable, '-m', module, '--config=configs/lm.py', f'--workdir={workdir}', *args]


def _env(devices=1):
  return dict(os.environ, JAX_PLATFORMS='cpu', PYTHONUNBUFFERED='1',
              XLA_FLAGS=f'--xla_force_host_platform_device_count={devices}')


def _train(workdir, steps=6, checkpoint_every=2, devices=1, **flags):
  result = subprocess.run(_command('experiments.train', workdir, steps, checkpoint_every, **flags),
                          cwd=REPO, env=_env(devices), capture_output=True, text=True, timeout=300)
  assert result.returncode == 0, result.stderr[-3000:]
  return result.stdout + result.stderr


def _final_params(workdir, step=None):
  return helpers.final_params(workdir, load_config(workdir), step)


def _assert_same_params(a, b):
  jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=1e-6, atol=1e-7), a, b)


def test_two_processes_match_one_process_and_resume(tmp_path):
  """2 processes x 2 devices == 1 process x 4 devices, through a checkpoint and a restart."""
  _train(tmp_path / 'single', steps=4, devices=4, **{'mesh.fsdp': 2, 'mesh.data': 2})
  launch = [sys.executable, '-m', 'experiments.launch_local', '--num_processes=2',
            '--devices_per_process=2', '--',
            *_command('experiments.train', tmp_path / 'multi', 4, 2,
                      **{'mesh.fsdp': 2, 'mesh.data': 2})[3:]]
  for attempt in range(2):
    result = subprocess.run(launch, cwd=REPO, env=_env(), capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stdout[-3000:]
    if attempt == 0:
      assert '[0] ' in result.stdout and '[1] ' in result.stdout
      # Process 0 alone writes the log: one line per step.
      assert [r['step'] for r in read_metrics(tmp_path / 'multi')] == [1, 2, 3, 4]
      shutil.rmtree(tmp_path / 'multi' / 'checkpoints' / '4')  # Lost: resume from step 2.
  assert '[0] resumed from' in result.stdout
  single, multi = read_metrics(tmp_path / 'single'), read_metrics(tmp_path / 'multi')
  assert [r['step'] for r in multi] == [1, 2, 3, 4, 3, 4]
  np.testing.assert_allclose([r['loss'] for r in multi],
                             [single[i]['loss'] for i in (0, 1, 2, 3, 2, 3)], rtol=2e-5)


def test_sigterm_saves_the_current_step_and_the_restart_finishes_exactly(tmp_path):
  steps = 400
  command = _command('experiments.train', tmp_path / 'preempted', steps, 10_000)
  process = subprocess.Popen(command, cwd=REPO, env=_env(), stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT, text=True)
  metrics = tmp_path / 'preempted' / 'metrics.jsonl'
  deadline = time.monotonic() + 120
  while not (metrics.exists() and len(metrics.read_text().splitlines()) >= 5):
    assert process.poll() is None and time.monotonic() < deadline, process.stdout.read()
    time.sleep(0.05)
  process.send_signal(signal.SIGTERM)
  output, _ = process.communicate(timeout=120)
  assert process.returncode == 0, output[-3000:]
  saved = sorted(int(p.name) for p in (tmp_path / 'preempted' / 'checkpoints').iterdir())
  assert len(saved) == 1 and 5 <= saved[0] < steps
  assert f'preempted (SIGTERM): saved step {saved[0]}' in output

  resumed = _train(tmp_path / 'preempted', steps=steps, checkpoint_every=10_000)
  assert f'resumed from {tmp_path / "preempted" / "checkpoints" / str(saved[0])}' in resumed
  _train(tmp_path / 'whole', steps=steps, checkpoint_every=10_000)
  _assert_same_params(_final_params(tmp_path / 'preempted'), _final_params(tmp_path / 'whole'))


def _kill_when(command, checkpoints: pathlib.Path, ready) -> None:
  process = subprocess.Popen(command, cwd=REPO, env=_env(), stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL)
  deadline = time.monotonic() + 120
  while not ready(checkpoints):
    assert process.poll() is None and time.monotonic() < deadline
    time.sleep(0.001)
  process.kill()
  process.wait()


def _saving(checkpoints):
  return checkpoints.exists() and any('tmp' in p.name for p in checkpoints.iterdir())


def _completed(count):
  return lambda checkpoints: checkpoints.exists() and sum(
      p.name.isdigit() for p in checkpoints.iterdir()) >= count


def test_kill_9_at_any_moment_resumes_from_a_complete_checkpoint(tmp_path):
  steps, workdir = 60, tmp_path / 'killed'
  checkpoints = workdir / 'checkpoints'
  command = _command('experiments.train', workdir, steps, 3, **{'train.keep_checkpoints': 100})
  for ready in (_saving, _completed(3), _saving, lambda c: _completed(6)(c) and _saving(c)):
    _kill_when(command, checkpoints, ready)
    latest = Checkpointer(workdir, read_only=True).latest_step()
    if latest is not None:  # Whatever the moment, the latest step is whole: it restores.
      _final_params(workdir, latest)
  _train(workdir, steps=steps, checkpoint_every=3, **{'train.keep_checkpoints': 100})
  _train(tmp_path / 'whole', steps=steps, checkpoint_every=3)
  _assert_same_params(_final_params(workdir), _final_params(tmp_path / 'whole'))


def test_a_half_written_checkpoint_is_never_taken_as_whole(tmp_path):
  _train(tmp_path, steps=4)
  partial = tmp_path / 'checkpoints' / '6.orbax-checkpoint-tmp-1234'
  partial.mkdir()
  (partial / 'state').mkdir()
  assert Checkpointer(tmp_path, read_only=True).latest_step() == 4
  result = subprocess.run([sys.executable, '-m', 'experiments.eval', f'--workdir={tmp_path}',
                           '--step=6'], cwd=REPO, env=_env(), capture_output=True, text=True,
                          timeout=300)
  assert result.returncode == 1
  assert (f'error: No complete checkpoint for step 6 in {tmp_path / "checkpoints"} (complete '
          'steps: [2, 4])') in result.stderr


def test_a_damaged_checkpoint_is_one_clear_error(tmp_path):
  _train(tmp_path, steps=4)
  for path in (tmp_path / 'checkpoints' / '4' / 'state').rglob('*'):
    if path.is_file() and path.parent.name == 'd':
      path.write_bytes(b'garbage')
  for module in ('experiments.train', 'experiments.eval'):
    command = (_command(module, tmp_path, 8, 2) if module == 'experiments.train' else
               [sys.executable, '-m', module, f'--workdir={tmp_path}'])
    result = subprocess.run(command, cwd=REPO, env=_env(), capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 1
    assert f'error: Checkpoint {tmp_path / "checkpoints" / "4"} is damaged' in result.stderr
    assert "Traceback" not in result.stderr, result.stderr


def test_an_unreadable_data_file_is_one_clear_error(tmp_path):
  (tmp_path / 'train.array_record').write_bytes(b'not an array record file')
  result = subprocess.run(
      _command('experiments.train', tmp_path / 'run', 4, 2,
               **{'data.source': 'array_record', 'data.path': tmp_path / 'train.array_record',
                  'data.eval_path': tmp_path / 'train.array_record'}),
      cwd=REPO, env=_env(), capture_output=True, text=True, timeout=300)
  assert result.returncode == 1
  assert f"error: data.path='{tmp_path / 'train.array_record'}': cannot open as ArrayRecord" in (
      result.stderr)
  assert 'Traceback' not in result.stderr


def test_restore_onto_another_mesh_and_device_count(tmp_path):
  """Saved on 8 devices (fsdp=8); continued on 8 devices as (data 2, fsdp 2, tensor 2), then
  evaluated on 1 device: the same numbers as a run on one device throughout."""
  _train(tmp_path / 'one', steps=6, devices=1)
  _train(tmp_path / 'moved', steps=6, devices=8, **{'mesh.fsdp': 8, 'mesh.data': 1})
  shutil.rmtree(tmp_path / 'moved' / 'checkpoints' / '6')  # Continue from step 4 elsewhere.
  _train(tmp_path / 'moved', steps=6, devices=8,
         **{'mesh.fsdp': 2, 'mesh.data': 2, 'mesh.tensor': 2})
  one, moved = read_metrics(tmp_path / 'one'), read_metrics(tmp_path / 'moved')
  np.testing.assert_allclose([r['loss'] for r in moved[-2:]], [r['loss'] for r in one[-2:]],
                             rtol=2e-5)
  results = {}
  for name in ('one', 'moved'):
    subprocess.run([sys.executable, '-m', 'experiments.eval', f'--workdir={tmp_path / name}'],
                   cwd=REPO, env=_env(1), check=True, capture_output=True, timeout=300)
    results[name] = json.loads((tmp_path / name / 'eval' / 'step_6.json').read_text())
  np.testing.assert_allclose(results['moved']['loss'], results['one']['loss'], rtol=1e-5)


def test_sigterm_to_a_multi_process_job_saves_one_agreed_step(tmp_path):
  """The launcher passes SIGTERM on; jax's preemption service picks one step for both."""
  launch = [sys.executable, '-m', 'experiments.launch_local', '--num_processes=2',
            '--devices_per_process=2', '--',
            *_command('experiments.train', tmp_path, 400, 10_000,
                      **{'mesh.fsdp': 4, 'mesh.data': 1})[3:]]
  process = subprocess.Popen(launch, cwd=REPO, env=_env(), stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT, text=True)
  metrics = tmp_path / 'metrics.jsonl'
  deadline = time.monotonic() + 180
  while not (metrics.exists() and len(metrics.read_text().splitlines()) >= 3):
    assert process.poll() is None and time.monotonic() < deadline, process.stdout.read()[-3000:]
    time.sleep(0.05)
  process.send_signal(signal.SIGTERM)
  output, _ = process.communicate(timeout=180)
  assert process.returncode == 0, output[-3000:]
  saved = [int(p.name) for p in (tmp_path / 'checkpoints').iterdir()]
  assert len(saved) == 1 and 3 <= saved[0] < 400
  assert f'[0] preempted (SIGTERM): saved step {saved[0]}' in output
