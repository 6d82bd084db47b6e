"""Training end to end on the embedded corpus: learning, exact resume, determinism, errors."""

import json
import pathlib
import shutil
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from gated_attention import checkpoint as checkpoint_lib
from gated_attention import config as config_lib
from gated_attention import init_from as init_from_lib
from gated_attention import resume as resume_lib
from gated_attention import sharding as sharding_lib
from gated_attention import state as state_lib
from gated_attention import train as train_lib
from gated_attention.aot import CompileError
from gated_attention.config import ConfigError
from gated_attention.data import DataError
from gated_attention.metrics import read_metrics
from gated_attention.optimizer import weight_decay_mask
from gated_attention.tokenizer import save_byte_tokenizer
from gated_attention.train import (TrainingError, compile_train_step, initialize_from_run,
                                   initialize_train_state, is_loss_spike, setup_train_state, train)
from tests import helpers

LOGGED_KEYS = {'step', 'loss', 'learning_rate', 'grad_norm', 'tokens_per_sec', 'step_time_s', 'mfu',
               'loss_spike', 'loss_spikes', 'skipped_steps'}


def test_loss_falls_and_every_log_line_has_the_promised_keys(tmp_path, capsys):
  config = helpers.run_config(steps=30, log_every=5, learning_rate=1e-2, checkpoint_every=10)
  config.model.moe.top_k = 4  # Read by no dense model: named, not silently dropped.
  train(config, tmp_path)
  assert 'warning: model.moe.top_k=4: not read by this run' in capsys.readouterr().err
  records = read_metrics(tmp_path)
  assert [r['step'] for r in records] == [5, 10, 15, 20, 25, 30]
  assert all(LOGGED_KEYS <= set(r) for r in records)
  assert records[-1]['loss'] < records[0]['loss'] - 1.0
  assert records[-1]['loss'] < 3.7  # ln(384) = 5.95 at chance.
  assert all(r['tokens_per_sec'] > 0 and r['mfu'] is None for r in records)  # CPU: no peak known.
  assert sorted(p.name for p in (tmp_path / 'checkpoints').iterdir()) == ['20', '30']
  assert any((tmp_path / 'tensorboard').iterdir())


def test_resume_after_a_crash_is_exact(tmp_path):
  """8 steps in one run == 4 steps, a crash (the step-8 checkpoint lost), a restart, 4 more."""
  config = helpers.run_config(steps=8)
  train(config, tmp_path / 'whole')
  train(config, tmp_path / 'resumed')
  shutil.rmtree(tmp_path / 'resumed' / 'checkpoints' / '8')  # As if killed after step 4 saved.
  train(config, tmp_path / 'resumed')

  whole, resumed = read_metrics(tmp_path / 'whole'), read_metrics(tmp_path / 'resumed')
  assert [r['loss'] for r in resumed[-4:]] == [r['loss'] for r in whole[4:]]  # Same batches.
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7),
               helpers.final_params(tmp_path / 'whole', config),
               helpers.final_params(tmp_path / 'resumed', config))


def test_same_seed_gives_identical_runs_and_another_seed_does_not(tmp_path):
  config = helpers.run_config(steps=4)
  for name in ('a', 'b'):
    train(config, tmp_path / name)
  config.train.seed = 1
  train(config, tmp_path / 'c')
  losses = {name: [r['loss'] for r in read_metrics(tmp_path / name)] for name in 'abc'}
  assert losses['a'] == losses['b'] != losses['c']
  jax.tree.map(np.testing.assert_array_equal, helpers.final_params(tmp_path / 'a', config),
               helpers.final_params(tmp_path / 'b', config))


def test_non_finite_loss_stops_with_a_clear_message(tmp_path):
  config = helpers.run_config(steps=4)
  config.model.init_std = 1e30  # Overflows in the first forward pass.
  with pytest.raises(TrainingError, match='Non-finite loss .* at step 1; stopping: no checkpoint'):
    train(config, tmp_path)


def test_a_resume_that_cannot_continue_the_run_is_refused(tmp_path):
  train(helpers.run_config(steps=2), tmp_path)
  other = helpers.run_config(steps=2)
  other.model.num_layers = 3
  with pytest.raises(checkpoint_lib.CheckpointError,
                     match=r'its model differs \(model\.num_layers: 2 -> 3\)\. Use'):
    train(other, tmp_path)
  with pytest.raises(ConfigError, match=f'train.steps=1 is below step 2, where the run in '
                                        f'{tmp_path} already is'):
    train(helpers.run_config(steps=1, warmup_steps=0), tmp_path)


@pytest.mark.parametrize('key, reason', [('dtype', 'this trainer does no loss scaling'),
                                         ('param_dtype', 'the optimizer state would be float16')])
def test_float16_training_is_refused_before_anything_runs(tmp_path, key, reason):
  config = helpers.run_config(steps=2)
  config.model[key] = 'float16'
  with pytest.raises(ConfigError, match=f'model.{key}=float16 does not train here: {reason}'):
    train(config, tmp_path)
  assert not any(tmp_path.iterdir())


def test_a_step_that_cannot_fit_in_memory_is_refused_before_step_1(tmp_path):
  config = helpers.run_config(steps=2)
  config.data.seq_len = 100_000
  config.model.attention_impl = 'xla'  # [L, L] scores: terabytes at this length.
  config.eval.batch_size = 1
  with pytest.raises(CompileError, match=r'the train step needs [\d,.]+ GiB per device .* more '
                                         r'than the [\d,.]+ GiB of .* Lower data\.seq_len'):
    train(config, tmp_path)
  # A start that never trained is not in the run's history.
  assert not any((tmp_path / name).exists()
                 for name in ('metrics.jsonl', 'history.jsonl', 'config.json'))


def test_an_eval_batch_the_held_out_split_cannot_fill_is_refused_at_start_up(tmp_path):
  config = helpers.run_config(steps=2)
  config.eval.batch_size = 10**6
  with pytest.raises(DataError, match='fewer than one eval batch of 1000000'):
    train(config, tmp_path)
  assert not (tmp_path / 'checkpoints').exists()


@pytest.mark.parametrize('args, message', [
    (['--config.model.gate.position=g9'],
     "error: model.gate.position='g9' is not accepted; choose one of"),
    (['--config.data.source=text_files', '--config.data.path=/no/such/*.txt'],
     "error: data.path='/no/such/*.txt' matches no files."),
    (['--config.data.batch_size=0'], 'error: data.batch_size=0 must be positive.'),
])
def test_command_line_errors_are_one_line_without_traceback(tmp_path, args, message):
  result = subprocess.run(
      [sys.executable, '-m', 'experiments.train', '--config=configs/lm.py',
       f'--workdir={tmp_path}', *args], capture_output=True, text=True, timeout=120)
  assert result.returncode == 1
  assert message in result.stderr
  assert 'Traceback' not in result.stderr


def test_the_learning_rate_rises_from_step_one_and_reaches_its_floor_at_the_last_step(tmp_path):
  """Step s (from 1) trains at learning_rate * s / warmup_steps up to the warmup's end, then on
  a cosine that reaches min_learning_rate at step train.steps; the log shows the same rates."""
  config = helpers.run_config(steps=6, warmup_steps=2, learning_rate=3e-3, min_learning_rate=3e-4)
  peak, floor, warmup, steps = 3e-3, 3e-4, 2, 6
  expected = [peak * s / warmup if s <= warmup else
              floor + (peak - floor) * 0.5 * (1 + np.cos(np.pi * (s - warmup) / (steps - warmup)))
              for s in range(1, steps + 1)]
  train(config, tmp_path)
  np.testing.assert_allclose([r['learning_rate'] for r in read_metrics(tmp_path)], expected,
                             rtol=1e-6)


def test_loss_spike_is_judged_against_a_robust_running_median():
  steady = [2.0] * 19 + [9.0]  # One earlier outlier does not move the median.
  assert is_loss_spike(steady, 2.3, window=20, margin=0.1)
  assert not is_loss_spike(steady, 2.15, window=20, margin=0.1)
  assert not is_loss_spike(steady[:10], 5.0, window=20, margin=0.1)  # Too few losses yet.
  assert not is_loss_spike([3.0] * 20, 2.0, window=20, margin=0.1)  # Falling loss.


def test_non_finite_updates_can_be_skipped_and_counted(tmp_path):
  config = helpers.run_config(steps=3, on_nonfinite='skip')
  config.model.init_std = 1e30
  record = train(config, tmp_path)
  assert record['skipped_steps'] == 3
  assert [r['skipped_steps'] for r in read_metrics(tmp_path)] == [1, 2, 3]
  for line in (tmp_path / 'metrics.jsonl').read_text().splitlines():  # Strict JSON: no NaN.
    record = json.loads(line, parse_constant=lambda name: pytest.fail(f'{name} in {line}'))
    assert record['loss'] is None and record['grad_norm'] is None
    # The schedule counts updates made: none, so every step logs the first update's rate.
    assert record['learning_rate'] == pytest.approx(3e-3 / config.train.warmup_steps)
  # No update reached the parameters: the last checkpoint holds the initial ones.
  mesh = helpers.one_device_mesh()
  shardings = state_lib.param_shardings(mesh, state_lib.abstract_model(config.model)[1])
  initial = state_lib.init_params(config.model, config.train.seed, shardings)
  jax.tree.map(np.testing.assert_array_equal, helpers.final_params(tmp_path, config),
               jax.tree.map(np.asarray, initial))


def test_a_loss_spike_is_logged_off_the_interval_counted_and_its_window_kept_across_a_resume(
    tmp_path):
  """Window 3, margin 25%: step 4's 3.0 against a median of 2.0 spikes and is logged though
  log_every is 100; after a resume at step 6 the window [3, 2, 2] is the saved one, so step 7's
  2.6 (> 2.5) spikes too (an empty window could not tell)."""
  config = helpers.run_config(steps=10, log_every=100, loss_spike_window=3,
                              loss_spike_margin=0.25)
  setup = setup_train_state(config, helpers.one_device_mesh())
  checkpointer = checkpoint_lib.Checkpointer(tmp_path)
  metrics = lambda loss: {'finite': True, 'loss': loss, 'learning_rate': 1e-3, 'grad_norm': 1.0}
  step_log = train_lib.StepLog(config, setup, tmp_path, 0, None, checkpointer)
  for step, loss in enumerate([2.0, 2.0, 2.0, 3.0, 2.0, 2.0], start=1):
    step_log.finish(step, metrics(loss))
  saved = step_log.state()
  step_log.close()
  resumed = train_lib.StepLog(config, setup, tmp_path, 6, saved, checkpointer)
  resumed.finish(7, metrics(2.6))
  resumed.close()
  checkpointer.close()
  records = read_metrics(tmp_path)
  assert [(r['step'], r['loss_spike'], r['loss_spikes']) for r in records] == [
      (4, True, 1), (7, True, 2)]


def test_microbatches_give_the_same_update_as_one_batch(tmp_path):
  """Gradient accumulation over 4 parts == the whole batch at once (equal parts, no padding)."""
  for microbatches in (1, 4):
    train(helpers.run_config(steps=3, microbatches=microbatches), tmp_path / str(microbatches))
  whole, parts = (read_metrics(tmp_path / name) for name in ('1', '4'))
  np.testing.assert_allclose([r['loss'] for r in parts], [r['loss'] for r in whole], rtol=1e-5)
  config = helpers.run_config(steps=3)
  # Adam's first steps move each weight by about the learning rate times g / |g|, so a gradient
  # element near 0 turns summation-order noise into ~1e-6 (a wrong accumulation moves ~1e-3).
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5),
               helpers.final_params(tmp_path / '1', config),
               helpers.final_params(tmp_path / '4', config))


@pytest.mark.parametrize('moe', [False, True])
def test_microbatches_weigh_every_counted_target_alike_however_padding_falls(moe):
  """Microbatch 0 holds 4 counted targets, microbatch 1 holds 60: the loss and the update are
  still the whole batch's (a mean of the parts' means would weigh microbatch 0's 15x). One
  step, at half the peak rate (warmup 2 of 3 steps)."""
  config = helpers.run_config(steps=3)
  config.data.update(seq_len=16, batch_size=4)
  if moe:
    config.model.moe.update(num_experts=4, top_k=1, expert_mlp_dim=32)
  tokens = np.array(helpers.random_tokens(3, 4, 17, 256))
  tokens[0::2, 3:] = 256  # PAD: rows 0 and 2 form microbatch 0 of two.
  results = {}
  for microbatches in (1, 2):
    config.train.microbatches = microbatches
    setup = setup_train_state(config, sharding_lib.make_mesh(config.mesh))
    state = initialize_train_state(config, setup)
    results[microbatches] = jax.device_get(compile_train_step(config, setup)(state, tokens))
  (whole_state, whole), (parts_state, parts) = results[1], results[2]
  np.testing.assert_allclose(parts['loss'], whole['loss'], rtol=1e-6)
  if moe:  # The z-loss, a mean over non-PAD tokens, weighs them alike too.
    np.testing.assert_allclose(parts['router_z_loss'], whole['router_z_loss'], rtol=1e-5)
  else:  # The load-balance loss is each microbatch's (documented), so not for MoE.
    np.testing.assert_allclose(parts['grad_norm'], whole['grad_norm'], rtol=1e-5)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5),
                 parts_state['params'], whole_state['params'])


def test_two_updates_are_adamw_on_the_clipped_gradient_with_decay_on_matrices_only():
  """Two compiled train steps against NumPy: the gradient of the mean next-token cross-entropy
  (jax.grad of a loss written here), clipped to train.grad_clip by its global norm (logged
  before clipping), Adam with bias correction, decoupled weight decay times the learning rate
  on parameters of two or more dims except the gate's input-independent score, the warmup's
  rates. The clip is small enough to act on both steps and changes how they mix."""
  config = helpers.run_config(steps=4, gate='g1_input_independent', grad_clip=1e-3,
                              weight_decay=0.5)
  config.data.update(seq_len=16, batch_size=4)
  train_config = config.train
  setup = setup_train_state(config, helpers.one_device_mesh())
  state = initialize_train_state(config, setup)
  batches = [np.array(helpers.random_tokens(seed, 4, 17, 256)) for seed in (1, 2)]
  params = jax.tree.map(lambda x: np.asarray(x, np.float64), jax.device_get(state['params']))

  def loss(p, tokens):
    logits = nnx.merge(setup.graphdef, p)(tokens[:, :-1]).logits
    return optax.softmax_cross_entropy_with_integer_labels(logits, tokens[:, 1:]).mean()

  step = compile_train_step(config, setup)
  moments = {'m': jax.tree.map(np.zeros_like, params), 'v': jax.tree.map(np.zeros_like, params)}
  for t, tokens in enumerate(batches, start=1):
    grads = jax.tree.map(lambda g: np.asarray(g, np.float64), jax.grad(loss)(
        jax.tree.map(lambda p: jnp.asarray(p, jnp.float32), params), jnp.asarray(tokens)))
    norm = np.sqrt(sum(np.sum(g * g) for g in jax.tree.leaves(grads)))
    clipped = jax.tree.map(lambda g: g * min(1.0, train_config.grad_clip / norm), grads)
    b1, b2, eps = train_config.b1, train_config.b2, 1e-8
    moments = {'m': jax.tree.map(lambda m, g: b1 * m + (1 - b1) * g, moments['m'], clipped),
               'v': jax.tree.map(lambda v, g: b2 * v + (1 - b2) * g * g, moments['v'], clipped)}
    rate = train_config.learning_rate * t / train_config.warmup_steps  # Warmup: steps 1, 2.

    def update(path, p, m, v):
      decays = p.ndim >= 2 and path[-1].key != 'score'
      adam = (m / (1 - b1 ** t)) / (np.sqrt(v / (1 - b2 ** t)) + eps)
      return p - rate * (adam + train_config.weight_decay * p * decays)

    params = jax.tree_util.tree_map_with_path(update, params, moments['m'], moments['v'])
    state, metrics = step(state, tokens)
    assert float(metrics['grad_norm']) == pytest.approx(norm, rel=1e-4)
    assert float(metrics['learning_rate']) == pytest.approx(rate, rel=1e-6)
    jax.tree.map(lambda ours, expected: np.testing.assert_allclose(ours, expected, rtol=1e-4,
                                                                   atol=1e-6),
                 jax.device_get(state['params']), params)
  assert norm > 10 * train_config.grad_clip  # The clip acted.


def test_a_microbatch_of_pad_alone_leaves_the_auxiliary_losses_as_the_rest_gives_them():
  """Rows 1 and 3 (microbatch 1 of two) are PAD after BOS: that part has one token per row, the
  other 16; its losses weigh 1/17 of the step's, so both stay near the one-part batch's (an
  equal-weight mean of the parts would move them by a large fraction)."""
  config = helpers.run_config(steps=3)
  config.data.update(seq_len=16, batch_size=4)
  config.model.moe.update(num_experts=4, top_k=1, expert_mlp_dim=32)
  tokens = np.array(helpers.random_tokens(4, 4, 17, 256))
  tokens[1::2, 1:] = 256
  metrics = {}
  for microbatches in (1, 2):
    config.train.microbatches = microbatches
    setup = setup_train_state(config, sharding_lib.make_mesh(config.mesh))
    state = initialize_train_state(config, setup)
    metrics[microbatches] = jax.device_get(compile_train_step(config, setup)(state, tokens)[1])
  np.testing.assert_allclose(metrics[2]['router_z_loss'], metrics[1]['router_z_loss'], rtol=1e-5)
  np.testing.assert_allclose(metrics[2]['load_balance_loss'], metrics[1]['load_balance_loss'],
                             rtol=0.1)


def test_step_times_leave_out_checkpoint_saves_and_the_first_steps_warm_up(tmp_path,
                                                                          monkeypatch):
  """A save (made 2 s slow) and the first run of the program (2 s slow) are not steps: the
  logged step times stay those of the steps themselves, and the first step logs none."""
  compile_step, save = train_lib.compile_train_step, checkpoint_lib.Checkpointer.save

  class SlowFirstCall:
    def __init__(self, compiled):
      self.compiled, self.calls = compiled, 0

    def __getattr__(self, name):  # memory_analysis() and the rest.
      return getattr(self.compiled, name)

    def __call__(self, *args):
      self.calls += 1
      if self.calls == 1:
        time.sleep(2)
      return self.compiled(*args)

  def slow_save(self, *args, **kwargs):
    time.sleep(2)
    return save(self, *args, **kwargs)

  monkeypatch.setattr(train_lib, 'compile_train_step',
                      lambda *args: SlowFirstCall(compile_step(*args)))
  monkeypatch.setattr(checkpoint_lib.Checkpointer, 'save', slow_save)
  train(helpers.run_config(steps=4, log_every=1, checkpoint_every=3), tmp_path)
  records = read_metrics(tmp_path)
  assert [r['step'] for r in records] == [1, 2, 3, 4]
  assert records[0]['step_time_s'] is None and records[0]['tokens_per_sec'] is None  # Untimed.
  assert all(r['step_time_s'] < 1.0 for r in records[1:]), records


def _profiled_steps(trace: pathlib.Path) -> list[int]:
  """The step numbers annotated in a jax.profiler trace file."""
  data = jax.profiler.ProfileData.from_file(str(trace))
  return sorted(dict(event.stats)['step_num'] for plane in data.planes for line in plane.lines
                for event in line.events if event.name == 'train')


def test_profile_traces_the_chosen_steps_counted_from_each_start(tmp_path):
  """profile_after=1, profile_steps=2 from step 1 traces steps 2 and 3; a resume at step 5 with
  profile_after=0 traces from step 6 to the last step, 7, not past it."""
  train(helpers.run_config(steps=5, profile_steps=2, profile_after=1), tmp_path)
  train(helpers.run_config(steps=7, profile_steps=5, profile_after=0), tmp_path)
  traces = sorted((tmp_path / 'profile' / 'process_0').glob('plugins/profile/*/*.xplane.pb'))
  assert [_profiled_steps(trace) for trace in traces] == [[2, 3], [6, 7]]
  # Where the last profile's time went, its ops joined to the compiled step.
  summary = json.loads((tmp_path / 'profile' / 'process_0' / 'summary.json').read_text())
  assert summary['steps'] == 2 and summary['categories_s']['matmul'] > 0
  # The ops of the traced steps alone: no more than every thread busy for their whole time.
  assert 0 < summary['op_time_s'] < helpers.busy_threads_at_most() * summary['step_time_s']


def test_a_run_resumes_and_evaluates_in_the_other_layer_layout(tmp_path):
  """A checkpoint of unrolled layers loads as scanned (the same arrays, stacked) and trains on
  as the run that never changed layout."""
  unrolled = helpers.run_config(steps=8)
  scanned = unrolled.copy_and_resolve_references()
  scanned.model.scan_layers = True
  train(unrolled, tmp_path / 'whole')
  train(unrolled.copy_and_resolve_references(), tmp_path / 'switched')
  shutil.rmtree(tmp_path / 'switched' / 'checkpoints' / '8')
  at_4 = helpers.final_params(tmp_path / 'switched', unrolled, step=4)
  stacked = [at_4['blocks'][i] for i in sorted(at_4['blocks'])]
  for path, leaf in jax.tree_util.tree_leaves_with_path(
      helpers.final_params(tmp_path / 'switched', scanned, step=4)['layers']):
    for layer, block in enumerate(stacked):
      np.testing.assert_array_equal(leaf[layer], _at(block, path))
  train(scanned, tmp_path / 'switched')
  helpers.assert_same_params(helpers.final_params(tmp_path / 'whole', scanned),
                             helpers.final_params(tmp_path / 'switched', scanned))


def _at(tree, path):
  for key in path:
    tree = tree[key.key]
  return tree


def test_weight_decay_falls_on_the_same_parameters_whether_layers_are_scanned_or_not():
  config = helpers.model_config()
  masks = {}
  for scan in (False, True):
    config.scan_layers = scan
    _, abstract = state_lib.abstract_model(config)
    masks[scan] = weight_decay_mask(nnx.to_pure_dict(abstract))
  assert jax.tree.leaves(state_lib.convert_layers(masks[False], True, stack=lambda *m: m[0])) \
      == jax.tree.leaves(masks[True])
  assert not masks[True]['layers']['attention_norm']['scale']
  assert masks[True]['layers']['attention']['wq']


def _initial_state(config):
  """The train state a new run of `config` starts from (its phases 3 and 4, nothing compiled
  for training)."""
  setup = setup_train_state(config, sharding_lib.make_mesh(config.mesh))
  state, plan = initialize_from_run(config, setup)
  return jax.tree.map(np.asarray, state), plan


def _unrolled(params, scan_layers: bool):
  return state_lib.convert_layers(params, False) if scan_layers else params


@pytest.fixture(scope='module')
def baseline_run(tmp_path_factory):
  """A 2-step ungated run with scanned layers: the source of the init_from tests."""
  workdir = tmp_path_factory.mktemp('source')
  config = helpers.run_config(steps=2, gate='none', checkpoint_every=2)
  config.model.scan_layers = True
  train(config, workdir)
  return workdir, _unrolled(helpers.final_params(workdir, config), True)


def test_init_from_with_a_changed_length_rope_and_schedule_starts_from_the_source_params(
    baseline_run, tmp_path):
  source_dir, source = baseline_run
  config = helpers.run_config(steps=3, gate='none', learning_rate=1e-3,
                              init_from=f'{source_dir}:2')
  config.data.seq_len = 64
  config.model.update(rope_theta=1e5, rope_scaling=dict(type='yarn', factor=2.0,
                                                        original_max_position=32))
  state, plan = _initial_state(config)  # Unrolled here, scanned in the source.
  helpers.assert_same_params(state['params'], source)
  assert plan.whole and len(plan.loaded) == len(jax.tree.leaves(source))
  assert int(state['step']) == 0
  assert all(not np.any(moment) for moment in jax.tree.leaves(state['opt_state'])
             if moment.ndim)  # A fresh optimizer: zero moments.

  train(config, tmp_path)  # End to end: trains on, and the start is recorded.
  history = [json.loads(line) for line in (tmp_path / 'history.jsonl').read_text().splitlines()]
  assert history[0]['init_from']['directory'] == str(source_dir.absolute())
  assert history[0]['init_from']['step'] == 2
  assert history[0]['changes']['data.seq_len'] == [32, 64]
  assert history[0]['changes']['model.rope_theta'] == [10_000.0, 1e5]


def test_init_from_adding_a_g1_gate_loads_everything_else_exactly(baseline_run):
  source_dir, source = baseline_run
  config = helpers.run_config(steps=2, gate='g1_elementwise', init_from=str(source_dir))
  state, plan = _initial_state(config)
  fresh = jax.tree.map(np.asarray, state_lib.init_params(config.model, config.train.seed, None))
  head_dim = config.model.head_dim
  for path, value in jax.tree_util.tree_leaves_with_path(state['params']):
    keys = tuple(key.key for key in path)
    want, init = source, fresh
    for key in keys:
      want, init = want[key], init[key]
    if keys[-1] == 'wq':  # [embed, heads, head_dim + gate]: the query columns are the source's.
      np.testing.assert_array_equal(value[..., :head_dim], want)
      np.testing.assert_array_equal(value[..., head_dim:], init[..., head_dim:])
    else:
      np.testing.assert_array_equal(value, want)
  assert plan.describe().endswith('gate columns initialised: blocks/*/attention/wq')
  assert not plan.initialised and not plan.dropped


def test_init_from_refuses_a_changed_parameter_shape_before_compiling(baseline_run, tmp_path):
  source_dir, _ = baseline_run
  config = helpers.run_config(steps=2, gate='none', init_from=str(source_dir))
  config.model.d_model = 64
  with pytest.raises(ConfigError, match=r"train.init_from='.*': parameter blocks/0/attention/wk "
                                        r'has shape \[32, 2, 8\] in .* step 2 but \[64, 2, 8\] in '
                                        r'this config \(model keys that differ: model.d_model: 32 '
                                        r'-> 64\)'):
    train(config, tmp_path)
  assert not any((tmp_path / 'checkpoints').glob('[0-9]*'))


def test_init_from_with_a_step_that_is_not_a_number_says_so(baseline_run, tmp_path):
  source_dir, _ = baseline_run
  config = helpers.run_config(steps=2, gate='none', init_from=f'{source_dir}:last')
  with pytest.raises(ConfigError, match="'last' is not a step number; give DIR or DIR:STEP"):
    train(config, tmp_path)


def test_init_from_a_step_the_source_lacks_names_the_complete_steps(baseline_run, tmp_path):
  source_dir, _ = baseline_run
  config = helpers.run_config(steps=2, gate='none', init_from=f'{source_dir}:7')
  with pytest.raises(ConfigError, match=r"train.init_from='.*:7': .* holds no complete checkpoint "
                                        r'of step 7 \(complete steps: \[2\]\)'):
    train(config, tmp_path)


def test_init_from_plans_a_removed_gate_and_refuses_another_depth():
  """From a G1 run to an ungated one, the query projection is loaded whole (its source's gate
  columns dropped, nothing initialised); a different depth is refused, not half loaded."""
  source = resume_lib.plain(helpers.run_config(steps=2, gate='g1_elementwise'))
  config = helpers.run_config(steps=2, gate='none', init_from='SRC')
  plan = init_from_lib.make_plan(config, pathlib.Path('SRC'), 2, source)
  count = len(nnx.to_flat_state(state_lib.abstract_model(config.model)[1]))
  assert plan.describe() == (f'initialising from SRC step 2: {count} of {count} parameters '
                             'loaded; source gate columns dropped: blocks/*/attention/wq')
  assert not plan.whole  # The source's moments have the gate's shape: not loadable.
  config.model.num_layers = 3
  with pytest.raises(ConfigError, match=r"train.init_from='SRC': SRC step 2 has "
                                        r'model.num_layers=2, this config 3'):
    init_from_lib.make_plan(config, pathlib.Path('SRC'), 2, source)


def test_init_from_refuses_another_tokenizer_and_takes_one_with_the_same_vocabulary(tmp_path):
  """Embedding rows stand for the source tokenizer's tokens: another vocabulary is refused, the
  byte tokenizer written as a tokenizer.json is the same one."""
  source = resume_lib.plain(helpers.run_config(steps=2, gate='none'))
  config = helpers.run_config(steps=2, gate='none', init_from='SRC')
  save_byte_tokenizer(tmp_path)
  config.data.tokenizer = str(tmp_path / 'tokenizer.json')
  init_from_lib.make_plan(config, pathlib.Path('SRC'), 2, source)
  config.data.tokenizer = 'none'
  with pytest.raises(ConfigError, match=r"SRC step 2 was trained with data.tokenizer='byte', "
                                        r"this config reads 'none': its embedding rows would "
                                        r"stand for other tokens"):
    init_from_lib.make_plan(config, pathlib.Path('SRC'), 2, source)


def test_init_from_a_gate_at_another_position_in_the_same_projection_starts_it_fresh():
  """G1 and G4 both carry W_theta in wq's columns, of equal shape: G1's gate columns are not
  loaded as G4's (they gated the SDPA output, G4's gate the queries); the query columns are."""
  source = resume_lib.plain(helpers.run_config(steps=2, gate='g1_elementwise'))
  config = helpers.run_config(steps=2, gate='g4_elementwise', init_from='SRC')
  plan = init_from_lib.make_plan(config, pathlib.Path('SRC'), 2, source)
  head_dim, width = config.model.head_dim, 2 * config.model.head_dim
  assert [entry[1:] for entry in plan.gate_columns] == [(head_dim, width, width)] * 2
  assert plan.describe().endswith('gate columns initialised: blocks/*/attention/wq; source gate '
                                  'columns dropped: blocks/*/attention/wq')
  # At G1 again (by its alias), with another activation: the gate is loaded whole.
  config.model.gate.update(position='g1', activation='silu')
  assert init_from_lib.make_plan(config, pathlib.Path('SRC'), 2, source).whole


def test_init_from_refuses_another_norm_scale_convention(baseline_run, tmp_path):
  """Norm scales have the same shape under model.norm_plus_one (scale 1 + w) as without (w),
  but not the same meaning."""
  source_dir, _ = baseline_run
  config = helpers.run_config(steps=2, gate='none', init_from=str(source_dir))
  config.model.norm_plus_one = True
  with pytest.raises(ConfigError, match=r'has model.norm_plus_one=False, this config True'):
    train(config, tmp_path)


def test_init_from_optimizer_loads_the_source_moments_only_when_every_parameter_matches(
    baseline_run):
  source_dir, source = baseline_run
  config = helpers.run_config(steps=2, gate='none', init_from=str(source_dir),
                              init_from_optimizer=True, learning_rate=1e-3)
  state, _ = _initial_state(config)
  helpers.assert_same_params(state['params'], source)
  assert int(state['step']) == 0
  assert any(np.any(moment) for moment in jax.tree.leaves(state['opt_state']) if moment.ndim)
  counted = (optax.ScaleByAdamState, optax.ScaleByScheduleState)
  nodes = jax.tree.leaves(state['opt_state'], is_leaf=lambda node: isinstance(node, counted))
  counts = {type(node).__name__: int(node.count) for node in nodes if isinstance(node, counted)}
  assert counts == {'ScaleByAdamState': 2, 'ScaleByScheduleState': 0}  # The new schedule's start.
  config.model.gate = config_lib.gate_config('g1_elementwise')
  with pytest.raises(ConfigError, match='train.init_from_optimizer=True needs every parameter '
                                        'loaded whole'):
    _initial_state(config)


def test_init_from_an_imported_model_loads_its_parameters_but_has_no_optimizer(tmp_path):
  """A parameters-only checkpoint (what import_hf writes) at step 0, unrolled layers, read by a
  scanned run."""
  source = helpers.run_config(gate='g1_headwise')
  params = helpers.random_params(source.model, seed=3)
  checkpointer = checkpoint_lib.Checkpointer(tmp_path)
  checkpointer.save_params(0, params, {}, source)
  checkpointer.close()
  config = helpers.run_config(gate='g1_headwise', init_from=f'{tmp_path}:0')
  config.model.scan_layers = True
  state, plan = _initial_state(config)
  helpers.assert_same_params(_unrolled(state['params'], True), jax.tree.map(np.asarray, params))
  assert plan.whole
  config.train.init_from_optimizer = True
  with pytest.raises(ConfigError, match='step 0 holds parameters only'):
    _initial_state(config)


def test_a_run_continues_in_a_workdir_holding_imported_parameters_as_init_from_would(tmp_path):
  """Training on in an imported model's workdir (a step-0 parameters-only checkpoint, unrolled)
  and a new scanned run with train.init_from on it end with the same parameters."""
  source = helpers.run_config(steps=2)
  checkpointer = checkpoint_lib.Checkpointer(tmp_path / 'imported')
  checkpointer.save_params(0, helpers.random_params(source.model, seed=3), {}, source)
  checkpointer.close()
  continued = source.copy_and_resolve_references()
  continued.model.scan_layers = True
  train(continued, tmp_path / 'imported')
  fresh = helpers.run_config(steps=2, init_from=f'{tmp_path / "imported"}:0')
  fresh.model.scan_layers = True
  train(fresh, tmp_path / 'fresh')
  helpers.assert_same_params(helpers.final_params(tmp_path / 'imported', continued),
                             helpers.final_params(tmp_path / 'fresh', continued))
