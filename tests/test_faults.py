"""Fault injection against the real command lines: kill -9 at any moment, SIGTERM and Ctrl-C, two
writers on one workdir, config edits between runs, a torn metrics line, corrupted array bytes, a
full disk, read-only and impossible workdirs, damaged checkpoints and data, and bad flags. Each
fault ends in a resumable run or in one `error:` line (exit status 1) that names what is wrong;
nothing is lost and nothing goes on silently wrong."""

import asyncio
import contextlib
import json
import logging as std_logging
import pathlib
import re
import shutil
import signal
import socket
import struct
import subprocess
import sys
import time

import pytest

from experiments import common
from gated_attention.checkpoint import Checkpointer
from gated_attention.metrics import read_metrics
from tests import helpers

TRAIN = 'experiments.train'
ZSTD_MAGIC = bytes.fromhex('28b52ffd')


def _eval(workdir) -> list[str]:
  return [sys.executable, '-m', 'experiments.eval', f'--workdir={workdir}']


def _error_line(result: subprocess.CompletedProcess) -> str:
  """The one line a refused command prints: exit status 1, no traceback, nothing else."""
  assert result.returncode == 1, (result.stdout + result.stderr)[-3000:]
  assert 'Traceback' not in result.stderr, result.stderr[-3000:]
  errors = [line for line in result.stderr.splitlines() if line.strip()]
  assert len(errors) == 1 and errors[0].startswith('error: '), result.stderr[-3000:]
  return errors[0]


@contextlib.contextmanager
def _started(args, output: pathlib.Path):
  """A command line running in the background, its output going to a file; killed on leaving
  the block if it still runs."""
  process = subprocess.Popen(args, cwd=helpers.REPO, env=helpers.env(), stdout=output.open('w'),
                             stderr=subprocess.STDOUT, text=True)
  try:
    yield process
  finally:
    process.kill()
    process.wait()


def _finish(process: subprocess.Popen, output: pathlib.Path, timeout=120) -> str:
  process.wait(timeout=timeout)
  return output.read_text()


def _wait_for(process: subprocess.Popen, output: pathlib.Path, ready, timeout=120) -> None:
  deadline = time.monotonic() + timeout
  while not ready():
    assert process.poll() is None and time.monotonic() < deadline, output.read_text()[-3000:]
    time.sleep(0.05)


def _logged_steps(workdir, count):
  metrics = pathlib.Path(workdir) / 'metrics.jsonl'
  return lambda: metrics.exists() and len(metrics.read_text().splitlines()) >= count


def _in_parallel(commands: dict, timeout=300) -> dict:
  """Runs several command lines at once, each bounded in time; {name: CompletedProcess}."""
  processes = {name: subprocess.Popen(args, cwd=helpers.REPO, env=helpers.env(),
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
               for name, args in commands.items()}
  results = {}
  try:
    for name, process in processes.items():
      stdout, stderr = process.communicate(timeout=timeout)
      results[name] = subprocess.CompletedProcess(process.args, process.returncode, stdout,
                                                  stderr)
  finally:
    for process in processes.values():
      process.kill()
      process.wait()
  return results


@pytest.fixture(scope='module')
def trained_run(tmp_path_factory):
  """A finished 4-step command-line run with checkpoints at steps 2 and 4; tests copy it."""
  workdir = tmp_path_factory.mktemp('trained') / 'run'
  helpers.train_cli(workdir, steps=4, checkpoint_every=2)
  return workdir


def _copy(run, tmp_path) -> pathlib.Path:
  return pathlib.Path(shutil.copytree(run, tmp_path / 'run'))


# --- Signals and kill -9 ---------------------------------------------------------------------

def test_sigterm_saves_the_current_step_and_the_restart_finishes_exactly(tmp_path):
  steps, log = 400, tmp_path / 'log'
  with _started(helpers.command(TRAIN, tmp_path / 'preempted', steps, 10_000), log) as process:
    _wait_for(process, log, _logged_steps(tmp_path / 'preempted', 5))
    process.send_signal(signal.SIGTERM)
    output = _finish(process, log)
  assert process.returncode == 0, output[-3000:]
  saved = sorted(int(p.name) for p in (tmp_path / 'preempted' / 'checkpoints').iterdir())
  assert len(saved) == 1 and 5 <= saved[0] < steps
  assert f'preempted (SIGTERM): saved step {saved[0]}' in output

  resumed = helpers.train_cli(tmp_path / 'preempted', steps=steps, checkpoint_every=10_000)
  assert f'resumed from {tmp_path / "preempted" / "checkpoints" / str(saved[0])}' in resumed
  helpers.train_cli(tmp_path / 'whole', steps=steps, checkpoint_every=10_000)
  helpers.assert_same_params(helpers.run_params(tmp_path / 'preempted'),
                             helpers.run_params(tmp_path / 'whole'))


def test_a_signal_while_the_last_checkpoint_is_written_neither_kills_it_nor_the_run(tmp_path):
  """SIGTERM or Ctrl-C arriving as the run ends, while its last save may be in flight (sent
  here from inside Checkpointer.close), is still handled by the run: the save completes."""
  script = ('import os, signal, sys\n'
            'from gated_attention import checkpoint, train\n'
            'from tests import helpers\n'
            'close = checkpoint.Checkpointer.close\n'
            'def close_after_a_signal(self):\n'
            '  os.kill(os.getpid(), getattr(signal, sys.argv[1]))\n'
            '  close(self)\n'
            'checkpoint.Checkpointer.close = close_after_a_signal\n'
            'train.train(helpers.run_config(steps=4, checkpoint_every=2), sys.argv[2])\n')
  for name in ('SIGTERM', 'SIGINT'):
    result = helpers.run([sys.executable, '-c', script, name, str(tmp_path / name)])
    assert result.returncode == 0, (result.returncode, result.stderr[-3000:])
    assert sorted(p.name for p in (tmp_path / name / 'checkpoints').iterdir()) == ['2', '4']


def test_a_signal_while_the_run_starts_stops_it_after_its_first_step_or_aborts_it(tmp_path):
  """A preemption during start-up (here: as the train step compiles) is not a crash: the run
  takes one step, saves it, and exits 0. Ctrl-C there aborts at once: nothing to save."""
  script = ('import os, signal, sys\n'
            'from gated_attention import train\n'
            'from tests import helpers\n'
            'compile_step = train.compile_train_step\n'
            'def compile_after_a_signal(*args):\n'
            '  os.kill(os.getpid(), getattr(signal, sys.argv[1]))\n'
            '  return compile_step(*args)\n'
            'train.compile_train_step = compile_after_a_signal\n'
            'train.train(helpers.run_config(steps=4, checkpoint_every=2), sys.argv[2])\n')
  result = helpers.run([sys.executable, '-c', script, 'SIGTERM', str(tmp_path / 'term')])
  assert result.returncode == 0, (result.returncode, result.stderr[-3000:])
  assert 'preempted (SIGTERM): saved step 1' in result.stdout
  assert sorted(p.name for p in (tmp_path / 'term' / 'checkpoints').iterdir()) == ['1']
  result = helpers.run([sys.executable, '-c', script, 'SIGINT', str(tmp_path / 'int')])
  assert result.returncode != 0 and 'KeyboardInterrupt' in result.stderr
  assert not [p for p in (tmp_path / 'int' / 'checkpoints').iterdir() if p.name.isdigit()]


def _kill_when(command, checkpoints: pathlib.Path, ready, output: pathlib.Path) -> None:
  with _started(command, output) as process:
    deadline = time.monotonic() + 120
    while not ready(checkpoints):
      assert process.poll() is None and time.monotonic() < deadline, output.read_text()[-3000:]
      time.sleep(0.001)


def _saving(checkpoints):
  return checkpoints.exists() and any('tmp' in p.name for p in checkpoints.iterdir())


def _completed(count):
  return lambda checkpoints: checkpoints.exists() and sum(
      p.name.isdigit() for p in checkpoints.iterdir()) >= count


def test_kill_9_at_any_moment_resumes_from_a_complete_checkpoint(tmp_path):
  """Also: the lock of a killed run never stands in the way of the next one."""
  steps, workdir = 60, tmp_path / 'killed'
  checkpoints = workdir / 'checkpoints'
  command = helpers.command(TRAIN, workdir, steps, 3, **{'train.keep_checkpoints': 100})
  for ready in (_saving, _completed(3), _saving, lambda c: _completed(6)(c) and _saving(c)):
    _kill_when(command, checkpoints, ready, tmp_path / 'log')
    latest = Checkpointer(workdir, read_only=True).latest_step()
    if latest is not None:  # Whatever the moment, the latest step is whole: it restores.
      helpers.run_params(workdir, latest)
  helpers.train_cli(workdir, steps=steps, checkpoint_every=3, **{'train.keep_checkpoints': 100})
  helpers.train_cli(tmp_path / 'whole', steps=steps, checkpoint_every=3)
  helpers.assert_same_params(helpers.run_params(workdir), helpers.run_params(tmp_path / 'whole'))
  assert [r['step'] for r in read_metrics(workdir)] == list(range(1, steps + 1))


# --- Two writers, one workdir ----------------------------------------------------------------

def test_one_writer_per_workdir_while_eval_reads_and_ctrl_c_saves(tmp_path):
  """While a run trains, a second trainer (another learning rate) on its workdir is refused
  naming the run, and writes nothing; eval reads the latest complete checkpoint. Ctrl-C then
  saves like SIGTERM."""
  workdir, log = tmp_path / 'run', tmp_path / 'log'
  with _started(helpers.command(TRAIN, workdir, 100_000, 200), log) as first:
    _wait_for(first, log, lambda: _completed(1)(workdir / 'checkpoints'))
    results = _in_parallel({
        'second': helpers.command(TRAIN, workdir, 100_000, 200, **{'train.learning_rate': 0.01}),
        'eval': _eval(workdir)}, timeout=120)
    assert _error_line(results['second']).startswith(
        f'error: {workdir} is in use by another run (pid {first.pid} on '
        f'{socket.gethostname()}, started 20')
    assert results['eval'].returncode == 0, results['eval'].stderr[-3000:]
    assert 'held-out loss' in results['eval'].stdout
    assert json.loads((workdir / 'config.json').read_text())['train']['learning_rate'] == 2e-3
    logged = [r['step'] for r in read_metrics(workdir)]
    assert logged == list(range(1, len(logged) + 1))

    first.send_signal(signal.SIGINT)
    output = _finish(first, log)
  assert first.returncode == 0 and 'Traceback' not in output, output[-3000:]
  saved = Checkpointer(workdir, read_only=True).latest_step()
  assert f'interrupted (SIGINT): saved step {saved}; run the same command to resume' in output
  assert max(r['step'] for r in read_metrics(workdir)) == saved


# --- Config edits between runs, and a crash mid-log ------------------------------------------

def _tensorboard_purge_steps(workdir) -> list[int]:
  """Steps of the SessionLog START events (TensorBoard hides earlier events from that step on)."""
  from tensorboardX.proto import event_pb2
  steps = []
  for path in sorted((workdir / 'tensorboard').iterdir()):
    data, offset = path.read_bytes(), 0
    while offset < len(data):  # TFRecord: length, its CRC, the record, its CRC.
      (length,) = struct.unpack('<Q', data[offset:offset + 8])
      event = event_pb2.Event.FromString(data[offset + 12:offset + 12 + length])
      offset += 16 + length
      if event.HasField('session_log') and event.session_log.status == event.session_log.START:
        steps.append(event.step)
  return steps


def test_resume_checks_the_config_saved_in_the_checkpoint(trained_run, tmp_path):
  workdir = _copy(trained_run, tmp_path)
  (workdir / 'config.json').unlink()
  changed = {'model.d_model': 64, 'model.gate.activation': 'silu', 'data.batch_size': 16,
             'train.learning_rate': 0.01}
  refused = _error_line(helpers.run(helpers.command(TRAIN, workdir, 8, 2, **changed)))
  assert refused == (
      f'error: Cannot resume {workdir / "checkpoints" / "4"}: its model differs (model.d_model: '
      "32 -> 64, model.gate.activation: 'sigmoid' -> 'silu'), and its data order differs "
      '(data.batch_size: 8 -> 16; pass --allow_data_change if that is intended). Use another '
      "--workdir, or the checkpoint's values.")
  assert not (workdir / 'config.json').exists()

  # A crash after step 4 was logged, before it was saved, in the middle of a line.
  shutil.rmtree(workdir / 'checkpoints' / '4')
  with (workdir / 'metrics.jsonl').open('a') as metrics:
    metrics.write('{"step": 5, "loss": 5.7')
  args = helpers.command(TRAIN, workdir, 6, 2, **{'data.batch_size': 16,
                                                  'train.learning_rate': 0.01})
  result = helpers.run([*args, '--allow_data_change'])
  assert result.returncode == 0, result.stderr[-3000:]
  assert [r['step'] for r in read_metrics(workdir)] == [1, 2, 3, 4, 5, 6]
  assert (workdir / 'metrics.jsonl').read_text().endswith('}\n')
  assert _tensorboard_purge_steps(workdir)[-1] == 3
  assert json.loads((workdir / 'config.json').read_text())['data']['batch_size'] == 16
  history = [json.loads(line) for line in (workdir / 'history.jsonl').read_text().splitlines()]
  assert [h['step'] for h in history] == [0, 2]
  assert history[1]['changes'] == {'data.batch_size': [8, 16], 'train.steps': [4, 6],
                                   'train.learning_rate': [0.002, 0.01]}
  assert history[1]['data_position'] == {'examples_consumed': 16, 'batch_size': 16,
                                         'batches': 1, 'examples_repeated': 0}


def test_a_resume_on_other_text_under_the_same_config_is_refused_in_one_line(tmp_path):
  """Edited files (or another Python's standard library) under an unchanged config: the
  checkpoint's data fingerprint differs; --allow_data_change continues on the new text."""
  corpus = tmp_path / 'corpus'
  corpus.mkdir()
  for index in range(4):
    (corpus / f'{index}.txt').write_text(f'document {index}: ' + 'some text to read. ' * 60)
  flags = {'data.source': 'text_files', 'data.path': str(corpus / '*.txt')}
  helpers.train_cli(tmp_path / 'run', steps=2, checkpoint_every=2, **flags)
  for index in range(4):
    path = corpus / f'{index}.txt'
    path.write_text(path.read_text().replace('read', 'keep'))  # Same length, other text.
  args = helpers.command(TRAIN, tmp_path / 'run', 4, 2, **flags)
  refused = _error_line(helpers.run(args))
  assert re.fullmatch(
      r"error: Cannot resume .*/checkpoints/2: its data order differs \(data.contents: "
      r"'\d+ examples, sha256 \w{12}' -> '\d+ examples, sha256 \w{12}'; pass "
      r'--allow_data_change if that is intended\)\. .*', refused), refused
  result = helpers.run([*args, '--allow_data_change'])
  assert result.returncode == 0, result.stderr[-3000:]
  assert 'data order changed' in result.stdout
  # The held-out document was edited too: said, so its losses are not compared across.
  assert re.search(r"resumed from .* data.heldout_contents: '\d+ examples, sha256 \w{12}' -> ",
                   result.stdout), result.stdout[-3000:]


# --- Damaged checkpoints and data ------------------------------------------------------------

def test_a_half_written_checkpoint_is_never_taken_as_whole(trained_run, tmp_path):
  workdir = _copy(trained_run, tmp_path)
  partial = workdir / 'checkpoints' / '6.orbax-checkpoint-tmp-1234'
  partial.mkdir()
  (partial / 'state').mkdir()
  assert Checkpointer(workdir, read_only=True).latest_step() == 4
  assert _error_line(helpers.run([*_eval(workdir), '--step=6'])) == (
      f'error: No complete checkpoint for step 6 in {workdir / "checkpoints"} (complete steps: '
      '[2, 4]).')


def test_a_damaged_checkpoint_is_one_clear_error(trained_run, tmp_path):
  workdir = _copy(trained_run, tmp_path)
  for path in (workdir / 'checkpoints' / '4' / 'state').rglob('*'):
    if path.is_file() and path.parent.name == 'd':
      path.write_bytes(b'garbage')
  results = _in_parallel({'train': helpers.command(TRAIN, workdir, 8, 2), 'eval': _eval(workdir)})
  for result in results.values():
    assert _error_line(result).startswith(
        f'error: Checkpoint {workdir / "checkpoints" / "4"} is damaged')


def test_reports_of_reads_that_failed_inside_orbax_are_dropped_and_others_kept():
  """asyncio's 'Task exception was never retrieved' for the reads that failed beside the one
  raised (the damaged-checkpoint test above saw one at exit, traceback and all) is dropped when
  the exception passed through orbax; any other report stays."""
  def report(raised_in: str | None) -> std_logging.LogRecord:
    exc_info = None
    if raised_in:
      try:
        exec(compile('raise ValueError("OUT_OF_RANGE: Error reading")', raised_in, 'exec'))
      except ValueError:
        exc_info = sys.exc_info()
    return std_logging.LogRecord('asyncio', std_logging.ERROR, asyncio.base_events.__file__, 1,
                                 'Task exception was never retrieved', None, exc_info)

  hide = common.HideBackgroundTracebacks()
  assert not hide.filter(report('/venv/site-packages/orbax/checkpoint/_src/serialization.py'))
  assert hide.filter(report(str(helpers.REPO / 'gated_attention' / 'checkpoint.py')))
  assert hide.filter(report(None))


def _zstd_frames(path: pathlib.Path) -> list[tuple[pathlib.Path, int, int]]:
  """(path, start, end) of each zstd frame in an array data file: one per array chunk."""
  data, starts = path.read_bytes(), []
  start = data.find(ZSTD_MAGIC)
  while start >= 0:
    starts.append(start)
    start = data.find(ZSTD_MAGIC, start + 1)
  return [(path, start, end) for start, end in zip(starts, starts[1:] + [len(data)])]


def test_corrupted_array_bytes_are_found_by_their_checksums(trained_run, tmp_path):
  """64 bytes flipped in the middle of the three largest arrays (the embedding, its Adam
  moments): they still decode, to wrong values (without checksums: a NaN held-out loss, and a
  resume that blames the learning rate)."""
  workdir = _copy(trained_run, tmp_path)
  frames = [frame for path in (workdir / 'checkpoints' / '4' / 'state').glob('ocdbt.process_0/d/*')
            for frame in _zstd_frames(path)]
  for path, start, end in sorted(frames, key=lambda frame: frame[2] - frame[1])[-3:]:
    data = bytearray(path.read_bytes())
    middle = (start + end) // 2
    data[middle:middle + 64] = bytes(byte ^ 0xFF for byte in data[middle:middle + 64])
    path.write_bytes(bytes(data))
  results = _in_parallel({'train': helpers.command(TRAIN, workdir, 8, 2), 'eval': _eval(workdir)})
  for name, array in (('train', 'opt_state/'), ('eval', 'params/embedding')):
    line = _error_line(results[name])
    assert line.startswith(
        f'error: Checkpoint {workdir / "checkpoints" / "4"} is damaged: {array}'), line
    assert 'differs from the checksum saved with it' in line or 'non-finite' in line


def test_an_unreadable_data_file_is_one_clear_error(tmp_path):
  (tmp_path / 'train.array_record').write_bytes(b'not an array record file')
  result = helpers.run(helpers.command(
      TRAIN, tmp_path / 'run', 4, 2, **{'data.source': 'array_record',
                                        'data.path': tmp_path / 'train.array_record',
                                        'data.eval_path': tmp_path / 'train.array_record'}))
  assert _error_line(result).startswith(
      f"error: data.path='{tmp_path / 'train.array_record'}': cannot open as ArrayRecord")


# --- Full disk, read-only and impossible workdirs --------------------------------------------

@pytest.fixture
def small_disk(tmp_path):
  """mount(size_bytes) -> a fresh tmpfs of that size; remount_read_only(); unmounted after."""
  mount_point = tmp_path / 'disk'
  mount_point.mkdir()

  def mount(size_bytes: int) -> pathlib.Path:
    result = subprocess.run(['mount', '-t', 'tmpfs', '-o', f'size={size_bytes}', 'tmpfs',
                             str(mount_point)], capture_output=True, text=True)
    if result.returncode:
      pytest.skip(f'cannot mount a tmpfs here ({result.stderr.strip()}): needs root or '
                  'CAP_SYS_ADMIN')
    return mount_point

  def remount_read_only() -> None:
    subprocess.run(['mount', '-o', 'remount,ro', str(mount_point)], check=True)

  yield mount, remount_read_only
  subprocess.run(['umount', str(mount_point)], capture_output=True)


def _disk_bytes(directory: pathlib.Path) -> int:
  """The disk space the files under `directory` take."""
  return sum(p.stat().st_blocks * 512 for p in directory.rglob('*'))


def test_a_full_disk_stops_the_run_at_once_and_loses_nothing(trained_run, small_disk, tmp_path):
  """Room for two checkpoints, not a third: the failed write ends the run in one line naming the
  last complete step, which restores. Read-only, the workdir is refused before anything is
  compiled; eval prints its result, then says it cannot write it."""
  mount, remount_read_only = small_disk
  checkpoint_bytes = _disk_bytes(trained_run / 'checkpoints' / '4')
  disk = mount(2 * checkpoint_bytes + checkpoint_bytes // 2)
  workdir = disk / 'run'
  line = _error_line(helpers.run(helpers.command(TRAIN, workdir, 12, 2)))
  assert 'No space left on device' in line
  # Whichever write meets the full disk first ends the run: the (asynchronous) save of step 6,
  # or a log line written while it runs. Either way the line names step 4 as what is kept.
  checkpoints = workdir / 'checkpoints'
  if line.startswith('error: Cannot write the logs'):
    assert line.endswith(f'stopping: the last checkpoint, step 4, is intact in {checkpoints}.')
  else:
    assert line.startswith(f'error: Saving checkpoint step 6 to {checkpoints} failed')
    assert line.endswith('stopping: the last complete checkpoint is step 4. Free space or fix '
                         'permissions there, then run the same command to resume.')
  assert max(r['step'] for r in read_metrics(workdir)) <= 9  # At once, not at step 12.
  assert Checkpointer(workdir, read_only=True).latest_step() == 4
  helpers.run_params(workdir, 4)

  remount_read_only()
  (tmp_path / 'a_file').write_text('')
  results = _in_parallel({'train': helpers.command(TRAIN, workdir, 12, 2),
                          'under_a_file': helpers.command(TRAIN, tmp_path / 'a_file' / 'run', 4, 2),
                          'eval': _eval(workdir)})
  assert _error_line(results['train']) == (
      f'error: Cannot write to the workdir {workdir} (Read-only file system); choose a writable '
      '--workdir.')
  assert 'compiled' not in results['train'].stdout
  assert _error_line(results['under_a_file']) == (
      f'error: Cannot write to the workdir {tmp_path / "a_file" / "run"} (Not a directory); '
      'choose a writable --workdir.')
  assert 'step 4: held-out loss' in results['eval'].stdout
  assert _error_line(results['eval']) == (
      f'error: Cannot write the result to {workdir / "eval"} (Read-only file system); it is '
      'printed above.')


def test_a_failed_save_names_the_checkpoint_that_survives_when_one_is_kept(trained_run,
                                                                           small_disk):
  """keep_checkpoints=1 and room for one and a half checkpoints: the save of step 4 fails while
  step 2 is still on disk (it is retired only once step 4 is whole), and the line names it."""
  mount, _ = small_disk
  checkpoint_bytes = _disk_bytes(trained_run / 'checkpoints' / '4')
  workdir = mount(checkpoint_bytes + checkpoint_bytes // 2) / 'run'
  line = _error_line(helpers.run(helpers.command(TRAIN, workdir, 8, 2,
                                                 **{'train.keep_checkpoints': 1})))
  checkpoints = workdir / 'checkpoints'
  if line.startswith('error: Cannot write the logs'):
    assert line.endswith(f'stopping: the last checkpoint, step 2, is intact in {checkpoints}.')
  else:
    assert line.startswith(f'error: Saving checkpoint step 4 to {checkpoints} failed')
    assert 'stopping: the last complete checkpoint is step 2.' in line
  assert Checkpointer(workdir, read_only=True).latest_step() == 2
  helpers.run_params(workdir, 2)


# --- Bad command lines -----------------------------------------------------------------------

def test_generate_takes_a_non_utf8_prompts_file_and_refuses_a_bad_mesh_in_one_line(trained_run,
                                                                                 tmp_path):
  prompts = tmp_path / 'prompts.txt'
  prompts.write_bytes(b'caf\xe9\n\xff\xfe text\n')  # Latin-1, not UTF-8: read as bytes.
  args = [sys.executable, '-m', 'experiments.generate', f'--workdir={trained_run}',
          f'--prompts_file={prompts}', '--max_new_tokens=2', '--json']
  results = _in_parallel({'file': args, 'mesh': args + ['--mesh=data=two']})
  assert results['file'].returncode == 0, results['file'].stderr[-2000:]
  completions = json.loads(results['file'].stdout.splitlines()[-1])['completions']
  assert [c['prompt_ids'][1:] for c in completions] == [[99, 97, 102, 0xe9], [0xff, 0xfe, 32, 116,
                                                                             101, 120, 116]]
  assert _error_line(results['mesh']) == "error: --mesh='data=two': data='two': expected an integer."


def test_every_main_refuses_bad_flags_in_one_line(tmp_path):
  module = lambda name, *args: [sys.executable, '-m', f'experiments.{name}', *args]
  corpus = tmp_path / 'corpus'
  corpus.mkdir()
  for name, text in (('a.txt', 'hello world ' * 50), ('b.txt', 'other text ' * 30)):
    (corpus / name).write_text(text)
  cases = {
      'unknown key': (module('train', f'--workdir={tmp_path}', '--config.model.nonexistent=1'),
                      "error: --config.model.nonexistent: the config has no key 'nonexistent'."),
      'misspelt key': (module('summary', '--config=configs/lm.py',
                              '--config.model.gate.activaton=silu'),
                       "error: --config.model.gate.activaton: the config has no key 'activaton'. "
                       'Did you mean "activation" instead of "activaton"?'),
      'config argument': (module('ablate', f'--workdir={tmp_path}',
                                 '--config=configs/ablation.py:size=huge'),
                          "size='huge' is not a known size; choose one of ['small', 'tiny']."),
      'config file': (module('benchmark', '--config=configs/nonexistent.py'),
                      "No such file or directory: 'configs/nonexistent.py'"),
      'process count': (['env', 'JAX_NUM_PROCESSES=abc',
                         *module('train', f'--workdir={tmp_path}')],
                        "error: JAX_NUM_PROCESSES='abc' must be an integer."),
      'seq_len': (module('prepare_data', '--input=x', f'--output_dir={tmp_path}', '--seq_len=0'),
                  'error: flag --seq_len=0: 0 is not a positive integer'),
      'heldout fraction': (module('prepare_data', '--input=x', f'--output_dir={tmp_path}',
                                  '--heldout_fraction=1.5'),
                           'error: flag --heldout_fraction=1.5: --heldout_fraction must be in '
                           '(0, 1).'),
      'no tokenizer': (module('prepare_data', '--input=x', f'--output_dir={tmp_path}',
                              '--tokenizer=none'),
                       "error: --tokenizer='none': text files need a tokenizer"),
      'mesh': (module('eval', f'--workdir={tmp_path}', '--mesh=data=two'),
               "error: --mesh='data=two': data='two': expected an integer."),
      'batches': (module('eval', f'--workdir={tmp_path}', '--batches=0'),
                  'error: flag --batches=0: 0 is not a positive integer'),
      'steps': (module('benchmark', '--steps=0'), 'error: flag --steps=0: 0 is not a positive integer'),
      'slices': (module('compile_only', '--num_slices=0'),
                 'error: flag --num_slices=0: 0 is not a positive integer'),
      'launcher': (module('launch_local', '--num_processes=0'),
                   'error: flag --num_processes=0: 0 is not a positive integer'),
      'temperature': (module('generate', f'--workdir={tmp_path}', '--prompt=x',
                             '--temperature=nan'),
                      'error: --temperature=nan must be >= 0 (0 is greedy).'),
      'top_p': (module('generate', f'--workdir={tmp_path}', '--prompt=x', '--top_p=0'),
                'error: --top_p=0.0 must be in (0, 1].'),
      'shard size': (module('export_hf', f'--workdir={tmp_path}', f'--out={tmp_path}',
                            '--max_shard_mb=0'),
                     'error: flag --max_shard_mb=0: 0 is not a positive integer'),
      'input': (module('prepare_data', '--input=/nonexistent/*.txt', f'--output_dir={tmp_path}'),
                "error: --input='/nonexistent/*.txt' matches no files."),
      'tokenizer path': (module('prepare_data', '--input=x', f'--output_dir={tmp_path}',
                                '--tokenizer=/nonexistent.json'),
                         "error: --tokenizer='/nonexistent.json' is not a file"),
      'short split': (module('prepare_data', f'--input={corpus}/*.txt',
                             f'--output_dir={tmp_path / "prepared"}', '--seq_len=400'),
                      'fewer than --seq_len=400: lower seq_len or add text.'),
      'gate block': (module('summary', '--config.model.gate=g1_headwise'),
                     'error: --config.model.gate=g1_headwise: a config block, not a value: set its '
                     'keys one by one'),
      'import key': (module('import_hf', f'--hf_dir={tmp_path}', f'--workdir={tmp_path}',
                            '--config.model.nonexistent=1'),
                     "error: --config.model.nonexistent: the config has no key 'nonexistent'."),
      'gate for every run': (module('ablate', f'--workdir={tmp_path}',
                                    '--config.model.gate.activation=ns_sigmoid'),
                             "error: --config.model.gate.activation=ns_sigmoid: --config.variants "
                             "sets each run's gate, so a gate key for every run would be "
                             'ignored; give it to the runs it is for: --config.variants='
                             'g1_elementwise+gate.activation=ns_sigmoid.'),
      'gate for every row': (module('benchmark', '--config.model.gate.mode=additive'),
                             "error: --config.model.gate.mode=additive: --gates sets each run's "
                             'gate'),
      'no seeds': (module('sink', f'--workdir={tmp_path}', '--seeds=,'),
                   "error: seeds=',' names nothing: give a comma-separated list."),
  }
  results = _in_parallel({name: args for name, (args, _) in cases.items()})
  for name, (_, message) in cases.items():
    assert message in _error_line(results[name]), name
  assert not (tmp_path / 'prepared').exists()  # Neither split written when one cannot be.
