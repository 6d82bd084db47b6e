"""Scale-out with real processes: several processes match one, a checkpoint restores onto another
mesh, SIGTERM to a multi-process job saves one agreed step; Ctrl-C and the process settings."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from gated_attention import config as config_lib
from gated_attention import distributed
from gated_attention import launch
from gated_attention.config import ConfigError
from gated_attention.metrics import read_metrics
from tests import helpers


def _launch(workdir, steps, checkpoint_every, **flags):
  return [sys.executable, '-m', 'experiments.launch_local', '--num_processes=2',
          '--devices_per_process=2', '--',
          *helpers.command('experiments.train', workdir, steps, checkpoint_every, **flags)[3:]]


def test_two_processes_match_one_process_and_resume(tmp_path):
  """2 processes x 2 devices == 1 process x 4 devices, through a checkpoint and a restart."""
  helpers.train_cli(tmp_path / 'single', steps=4, devices=4, **{'mesh.fsdp': 2, 'mesh.data': 2})
  launch = _launch(tmp_path / 'multi', 4, 2, **{'mesh.fsdp': 2, 'mesh.data': 2})
  for attempt in range(2):
    result = helpers.run(launch)
    assert result.returncode == 0, result.stdout[-3000:]
    if attempt == 0:
      assert '[0] ' in result.stdout and '[1] ' in result.stdout
      # Process 0 alone writes the log: one line per step.
      assert [r['step'] for r in read_metrics(tmp_path / 'multi')] == [1, 2, 3, 4]
      shutil.rmtree(tmp_path / 'multi' / 'checkpoints' / '4')  # Lost: resume from step 2.
  assert '[0] resumed from' in result.stdout
  single, multi = read_metrics(tmp_path / 'single'), read_metrics(tmp_path / 'multi')
  assert [r['step'] for r in multi] == [1, 2, 3, 4]  # Steps 3 and 4 logged once, by the resume.
  np.testing.assert_allclose([r['loss'] for r in multi], [r['loss'] for r in single], rtol=2e-5)


def test_a_tensor_axis_across_processes_trains_and_evaluates_as_one_process(tmp_path):
  """tensor=4 over 2 processes x 2 devices: both processes hold every row of each batch (they
  read the same part), and the eval step's outputs reach both. Losses and measurements equal
  one process's; value_norm stays per KV head (2) though the KV heads are repeated to 4."""
  mesh = {'mesh.data': 1, 'mesh.tensor': 4}
  helpers.train_cli(tmp_path / 'single', steps=2, checkpoint_every=2, devices=4, **mesh)
  result = helpers.run(_launch(tmp_path / 'multi', 2, 2, **mesh))
  assert result.returncode == 0, result.stdout[-3000:]
  single, multi = read_metrics(tmp_path / 'single'), read_metrics(tmp_path / 'multi')
  np.testing.assert_allclose([r['loss'] for r in multi], [r['loss'] for r in single], rtol=2e-5)
  result = helpers.run([sys.executable, '-m', 'experiments.launch_local', '--num_processes=2',
                        '--devices_per_process=2', '--module=experiments.eval', '--',
                        f'--workdir={tmp_path / "multi"}', '--mesh=data=1,fsdp=1,tensor=4'])
  assert result.returncode == 0, result.stdout[-3000:]
  result = helpers.run([sys.executable, '-m', 'experiments.eval',
                        f'--workdir={tmp_path / "single"}'])
  assert result.returncode == 0, result.stderr[-3000:]
  single, multi = (json.loads((tmp_path / run / 'eval' / 'step_2.json').read_text())
                   for run in ('single', 'multi'))
  for key in ('loss', 'tokens'):
    np.testing.assert_allclose(multi[key], single[key], rtol=1e-5)
  for key in ('first_token_attention', 'value_norm', 'max_activation', 'gate_score'):
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6),
                 multi[key], single[key])
  assert np.shape(multi['value_norm']['others']) == (2, 2)  # [layers, kv_heads]


def _one_and_two_processes(module, one: list[str], two: list[str]):
  """Runs `python -m module` with flags `one` in one process, then with flags `two` in two
  processes x 2 devices; returns the stdout lines of the one, of process 0 and of process 1."""
  single = helpers.run([sys.executable, '-m', module, *one])
  assert single.returncode == 0, single.stderr[-3000:]
  multi = helpers.run([sys.executable, '-m', 'experiments.launch_local', '--num_processes=2',
                       '--devices_per_process=2', f'--module={module}', '--', *two])
  assert multi.returncode == 0, multi.stdout[-3000:]
  return [single.stdout.splitlines()] + [
      [line[4:] for line in multi.stdout.splitlines() if line.startswith(f'[{rank}] ')]
      for rank in range(2)]


def test_generate_long_eval_export_and_import_run_across_processes_as_in_one(tmp_path):
  """A checkpoint read by 2 processes x 2 devices (batches split across both): the same
  generated ids, long-context losses, exported tensors and imported parameters as with one
  process, each line printed and each file written by process 0 alone (standard output is
  process 0's, also for a main that prints after its job)."""
  from safetensors.numpy import load_file
  config = config_lib.base_config('tiny', 'g1_elementwise')
  config.model.update(d_model=32, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=8,
                      mlp_dim=64)
  config.data.seq_len = 64
  run = tmp_path / 'run'
  helpers.random_workdir(run, config, std=0.05)
  only_process_0 = lambda zero, one, start: (sum(l.startswith(start) for l in zero) == 1
                                             and not any(l.startswith(start) for l in one))

  flags = [f'--workdir={run}', '--prompt=hello', '--prompt=abc', '--max_new_tokens=8', '--json']
  single, zero, one = _one_and_two_processes('experiments.generate', flags, flags)
  ids = lambda line: [c['token_ids'] for c in json.loads(line)['completions']]
  assert ids(zero[-1]) == ids(single[-1]) and len(ids(single[-1])) == 2
  assert only_process_0(zero, one, '{')

  for name in ('one', 'two'):
    shutil.copytree(run, tmp_path / name)
  flags = ['--lengths=128', '--examples=2', '--tasks=passkey']
  _, zero, one = _one_and_two_processes('experiments.long_eval',
                                        [f'--workdir={tmp_path / "one"}', *flags],
                                        [f'--workdir={tmp_path / "two"}', *flags])
  single, multi = (json.loads((tmp_path / name / 'long_eval' / 'step_0.json').read_text())
                   ['lengths']['128'] for name in ('one', 'two'))
  for key in ('loss', 'bucket_loss'):
    np.testing.assert_allclose(multi[key], single[key], rtol=1e-5)
  generated = lambda entry: [e['generated'] for e in entry['retrieval']['passkey']['examples']]
  assert generated(multi) == generated(single)
  assert only_process_0(zero, one, 'length 128:')

  _, zero, one = _one_and_two_processes('experiments.export_hf',
                                        [f'--workdir={run}', f'--out={tmp_path / "hf_one"}'],
                                        [f'--workdir={run}', f'--out={tmp_path / "hf_two"}'])
  single, multi = (load_file(str(tmp_path / name / 'model.safetensors'))
                   for name in ('hf_one', 'hf_two'))
  assert sorted(multi) == sorted(single) and len(single) == 24
  for name in single:
    np.testing.assert_array_equal(multi[name], single[name])
  assert only_process_0(zero, one, 'exported step 0')

  hf_dir = f'--hf_dir={tmp_path / "hf_one"}'
  _, zero, one = _one_and_two_processes('experiments.import_hf',
                                        [hf_dir, f'--workdir={tmp_path / "imported_one"}'],
                                        [hf_dir, f'--workdir={tmp_path / "imported_two"}'])
  helpers.assert_same_params(helpers.run_params(tmp_path / 'imported_two'),
                             helpers.run_params(tmp_path / 'imported_one'))
  assert only_process_0(zero, one, 'imported')

  flags = ['--config=configs/lm.py:size=tiny', '--json']  # Printed after the job returns.
  single, zero, one = _one_and_two_processes('experiments.summary', flags, flags)
  assert zero == single and one == []


def test_launch_local_names_the_failed_process_and_stops_the_others_at_once(tmp_path, capsys,
                                                                             monkeypatch):
  """A process whose peer died cannot step or save, and may well ignore SIGTERM (jax's
  preemption service catches it): the launcher does not wait out the preemption grace."""
  (tmp_path / 'stand_in.py').write_text(
      'import os, signal, sys, time\n'
      'if os.environ["JAX_PROCESS_ID"] == "1":\n'
      '  sys.exit(3)\n'
      'signal.signal(signal.SIGTERM, signal.SIG_IGN)\n'
      'time.sleep(120)\n')
  monkeypatch.setenv('PYTHONPATH', str(tmp_path))
  started = time.monotonic()
  assert launch.launch_local('stand_in', [], num_processes=2) == 3
  assert time.monotonic() - started < 15  # The preemption grace is 30 s.
  assert 'launch_local: process 1 exited with status 3; stopping the others' in (
      capsys.readouterr().err)


def test_processes_on_cpu_devices_keep_the_xla_flags_they_were_given(monkeypatch):
  """launch_local and the tests give each process its device count after the flags already
  set (they were dropped), and XLA's last flag wins over an earlier count."""
  monkeypatch.setenv('XLA_FLAGS', '--xla_cpu_enable_fast_math=false '
                                  '--xla_force_host_platform_device_count=8')
  environment = launch.cpu_devices_env(2)
  assert environment['XLA_FLAGS'] == ('--xla_cpu_enable_fast_math=false '
                                      '--xla_force_host_platform_device_count=8 '
                                      '--xla_force_host_platform_device_count=2')
  result = subprocess.run([sys.executable, '-c', 'import jax; print(jax.device_count())'],
                          env=dict(os.environ, **environment), capture_output=True, text=True,
                          timeout=120)
  assert result.stdout.split() == ['2'], result.stderr[-2000:]


def test_a_relaunch_loads_its_train_step_from_the_compilation_cache_and_trains_alike(tmp_path):
  """The same command line twice: the second run loads the train step the first compiled and
  ends with the same parameters. The runs choose their platform as a user's would (no
  JAX_PLATFORMS): where the TPU runtime is installed on a host without TPU chips, it starts
  without its host warnings."""
  environment = {key: value for key, value in helpers.env().items() if key != 'JAX_PLATFORMS'}
  environment.update(JAX_ENABLE_COMPILATION_CACHE='true',
                     JAX_COMPILATION_CACHE_DIR=str(tmp_path / 'cache'),
                     JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS='0')  # The tiny step compiles fast.
  outputs = []
  for run in ('first', 'second'):
    result = subprocess.run(helpers.command('experiments.train', tmp_path / run, 2, 2),
                            cwd=helpers.REPO, env=environment, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    outputs.append(result.stdout + result.stderr)
  assert 'train step compiled in' in outputs[0]
  assert 'train step loaded from the compilation cache in' in outputs[1]
  for output in outputs:
    assert 'TPU_WORKER_HOSTNAMES' not in output and 'host bounds' not in output, output[:2000]
  first, second = helpers.run_params(tmp_path / 'first'), helpers.run_params(tmp_path / 'second')
  jax.tree.map(np.testing.assert_array_equal, first, second)


def test_restore_onto_another_mesh_and_device_count(tmp_path):
  """Saved on 8 devices (fsdp=8); continued on 8 devices as (data 2, fsdp 2, tensor 2), then
  evaluated on 1 device: the same numbers as a run on one device throughout."""
  helpers.train_cli(tmp_path / 'one', steps=6, devices=1)
  helpers.train_cli(tmp_path / 'moved', steps=6, devices=8, **{'mesh.fsdp': 8, 'mesh.data': 1})
  shutil.rmtree(tmp_path / 'moved' / 'checkpoints' / '6')  # Continue from step 4 elsewhere.
  helpers.train_cli(tmp_path / 'moved', steps=6, devices=8,
                    **{'mesh.fsdp': 2, 'mesh.data': 2, 'mesh.tensor': 2})
  one, moved = read_metrics(tmp_path / 'one'), read_metrics(tmp_path / 'moved')
  np.testing.assert_allclose([r['loss'] for r in moved[-2:]], [r['loss'] for r in one[-2:]],
                             rtol=2e-5)
  results = {}
  for name in ('one', 'moved'):
    result = helpers.run([sys.executable, '-m', 'experiments.eval', f'--workdir={tmp_path / name}'])
    assert result.returncode == 0, result.stderr[-3000:]
    results[name] = json.loads((tmp_path / name / 'eval' / 'step_6.json').read_text())
  np.testing.assert_allclose(results['moved']['loss'], results['one']['loss'], rtol=1e-5)


def test_sigterm_to_a_multi_process_job_saves_one_agreed_step(tmp_path):
  """The launcher passes SIGTERM on; jax's preemption service picks one step for both."""
  process = subprocess.Popen(_launch(tmp_path, 400, 10_000, **{'mesh.fsdp': 4, 'mesh.data': 1}),
                             cwd=helpers.REPO, env=helpers.env(), stdout=subprocess.PIPE,
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


def test_a_second_ctrl_c_exits_at_once(monkeypatch):
  """Before the first step a SIGINT aborts (nothing to save); then the first asks the loop to
  save and stop, and the second exits without waiting."""
  exits, unwatched = [], []
  monkeypatch.setattr(os, '_exit', exits.append)
  outside = lambda signum, frame: unwatched.append(signum)  # Not KeyboardInterrupt: no abort.
  previous = signal.signal(signal.SIGINT, outside)
  try:
    watch = distributed.PreemptionWatch()
    with pytest.raises(KeyboardInterrupt):
      os.kill(os.getpid(), signal.SIGINT)
      time.sleep(1)  # The handler runs here at the latest.
    watch.stepping = True
    assert not watch.reached(1)
    os.kill(os.getpid(), signal.SIGINT)
    assert watch.reached(2) and watch.describe() == 'interrupted (SIGINT)' and exits == []
    os.kill(os.getpid(), signal.SIGINT)
    assert exits == [130] and unwatched == []
    watch.close()
    assert signal.getsignal(signal.SIGINT) is outside
  finally:
    signal.signal(signal.SIGINT, previous)


@pytest.mark.parametrize('variable, value, message', [
    ('JAX_NUM_PROCESSES', 'abc', "JAX_NUM_PROCESSES='abc' must be an integer"),
    ('JAX_PROCESS_ID', '-1', 'process id .* is -1'),
    ('JAX_COORDINATOR_ADDRESS', 'localhost', "coordinator address .* is 'localhost'"),
])
def test_bad_process_settings_are_named(monkeypatch, variable, value, message):
  for name in ('JAX_NUM_PROCESSES', 'JAX_PROCESS_ID', 'JAX_COORDINATOR_ADDRESS'):
    monkeypatch.delenv(name, raising=False)
  monkeypatch.setenv(variable, value)
  with pytest.raises(ConfigError, match=message):
    distributed.initialize('auto', None, None, None)


@pytest.mark.parametrize('platforms, on_cpu', [('cpu', True), ('tpu', False), ('cuda,cpu', False),
                                               (' cpu , tpu', True)])
def test_freed_host_memory_is_kept_only_where_steps_run_on_a_cpu(monkeypatch, platforms, on_cpu):
  """One malloc arena speeds XLA:CPU steps and slows multi-threaded compilers (libtpu 25%):
  JAX_PLATFORMS, where set, decides which backend runs the steps."""
  monkeypatch.setenv('JAX_PLATFORMS', platforms)
  assert distributed.steps_run_on_cpu() is on_cpu
