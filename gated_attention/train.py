"""The trainer. `train(config, workdir)` takes the workdir's lock, then reads top to bottom in
phases:

  1. mesh           build the device mesh from config.mesh
  2. data           the training split as a seeded grain pipeline, this process's share
  3. shardings      abstract model and train state, their shardings from logical axes
  4. init/restore   resume from the latest complete checkpoint in workdir (its config checked
                    against this one), else start from train.init_from's parameters (another
                    run's, `init_from`), else initialise
  5. compile        lower and compile the train step ahead of time; refuse it if it cannot fit
  6. loop           step, log, checkpoint; stop cleanly on a non-finite loss, a signal, or a
                    failed save

Every check that can fail runs before step 1. Process 0 alone writes logs, the config and the
history; every process reads its own data shard and takes part in checkpoint saves (orbax
coordinates them).
"""

import collections
import dataclasses
import json
import pathlib
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from tqdm import tqdm

from gated_attention import checkpoint as checkpoint_lib
from gated_attention import config as config_lib
from gated_attention import data as data_lib
from gated_attention import flops as flops_lib
from gated_attention import init_from as init_from_lib
from gated_attention import profiling
from gated_attention import resume as resume_lib
from gated_attention import sharding as sharding_lib
from gated_attention import state as state_lib
from gated_attention import workdir as workdir_lib
from gated_attention.distributed import CompileTimer, PreemptionWatch, log, warn
from gated_attention.loss import target_mask
from gated_attention.metrics import MetricsWriter, format_record
from gated_attention.model import apply, measured_positions
from gated_attention.optimizer import learning_rate_schedule, make_optimizer
from gated_attention.tokenizer import pad_id


class TrainingError(RuntimeError):
  """The run cannot go on (for example a non-finite loss); the message says why and what is kept."""

  def __init__(self, message: str, step: int | None = None):
    super().__init__(message)
    self.step = step


def make_train_step(graphdef, optimizer, schedule, moe_config, pad_id: int | None,
                    microbatches: int = 1):
  """train_step(state, tokens [batch, seq_len + 1]) -> (state, metrics).

  The objective is the next-token cross-entropy (`loss`, the mean over the batch's counted
  targets) plus, for mixture-of-experts models, load_balance_weight * load_balance_loss +
  router_z_weight * router_z_loss (both reported). With microbatches > 1 the batch is split
  into that many equal parts, one alive at a time, for one optimizer update: each part's
  cross-entropy is summed and divided by the whole batch's count of targets, so loss and
  gradients are those of the whole batch, padding or not; the auxiliary losses are each part's
  (over its tokens that are not PAD) weighted by its share of the batch's such tokens: the
  router z-loss, a mean over tokens, is then the whole batch's; the load-balance product is not
  additive over parts, so it is the token-weighted mean of the parts'. A step
  whose loss or gradient norm is not finite leaves parameters and optimizer state as they were
  (its `finite` metric is False); the loop decides what to do.
  """
  aux_weights = {'load_balance_loss': moe_config.load_balance_weight,
                 'router_z_loss': moe_config.router_z_weight}

  def objective(params, tokens, num_targets, num_inputs):
    """This part's share of the objective and metrics: its summed cross-entropy over the
    batch's num_targets, its auxiliary losses times its share of the batch's num_inputs (input
    tokens that are not PAD)."""
    output = apply(graphdef, params, tokens[:, :-1], targets=tokens[:, 1:], pad_id=pad_id)
    share = jnp.sum(measured_positions(tokens[:, :-1], pad_id)) / jnp.maximum(num_inputs, 1)
    metrics = {'loss': output.loss_sum / jnp.maximum(num_targets, 1),
               **{name: value * share for name, value in output.aux_losses.items()}}
    total = metrics['loss'] + sum(aux_weights[name] * value for name, value in metrics.items()
                                  if name in aux_weights)
    return total, metrics

  gradients = jax.value_and_grad(objective, has_aux=True)

  def accumulate(params, tokens, num_targets, num_inputs):
    """Gradients and metrics summed over the microbatches, one microbatch alive at a time."""
    batch = tokens.shape[0]
    # Rows i, i + k, ... form microbatch i, so every device keeps an equal share of each.
    parts = tokens.reshape(batch // microbatches, microbatches, -1).swapaxes(0, 1)
    parts = sharding_lib.constrain(parts, (None, 'batch', 'length'))
    zeros = jax.tree.map(jnp.zeros_like,
                         jax.eval_shape(gradients, params, parts[0], num_targets, num_inputs))

    def add(total, part):
      return jax.tree.map(jnp.add, total, gradients(params, part, num_targets, num_inputs)), None

    ((_, metrics), grads), _ = jax.lax.scan(add, zeros, parts)
    return metrics, grads

  def train_step(state, tokens):
    num_targets = jnp.sum(target_mask(tokens[:, 1:], pad_id))
    num_inputs = jnp.sum(measured_positions(tokens[:, :-1], pad_id))
    if microbatches == 1:
      (_, metrics), grads = gradients(state['params'], tokens, num_targets, num_inputs)
    else:
      metrics, grads = accumulate(state['params'], tokens, num_targets, num_inputs)
    grad_norm = optax.tree.norm(grads)
    updates, opt_state = optimizer.update(grads, state['opt_state'], state['params'])
    updated = {'step': state['step'] + 1, 'params': optax.apply_updates(state['params'], updates),
               'opt_state': opt_state}
    finite = jnp.isfinite(metrics['loss']) & jnp.isfinite(grad_norm)
    new_state = jax.tree.map(lambda new, old: jnp.where(finite, new, old), updated, state)
    metrics.update(grad_norm=grad_norm, finite=finite, learning_rate=schedule(state['step']))
    return new_state, metrics

  return train_step


def global_batch(local_tokens: np.ndarray, batch_sharding, part: tuple[int, int]) -> jax.Array:
  """The global batch from this process's part (index, count) of it (`sharding.batch_part`):
  each of its devices takes its rows from the part."""
  index, count = part
  rows = local_tokens.shape[0]
  shape = (rows * count, *local_tokens.shape[1:])

  def device_rows(slices):  # A device's global rows, read from this part.
    start, stop, _ = slices[0].indices(shape[0])
    return local_tokens[(slice(start - index * rows, stop - index * rows), *slices[1:])]

  return jax.make_array_from_callback(shape, batch_sharding, device_rows)


def compiled_memory(compiled) -> dict | None:
  """Per-device bytes of a compiled step: arguments, outputs, temporaries, and their total
  (donated arguments that alias outputs counted once); None where the backend gives none."""
  analysis = compiled.memory_analysis()
  if analysis is None:
    return None
  sizes = {'arguments': analysis.argument_size_in_bytes, 'outputs': analysis.output_size_in_bytes,
           'temporaries': analysis.temp_size_in_bytes}
  sizes['total'] = sum(sizes.values()) - analysis.alias_size_in_bytes
  return sizes


def describe_memory(compiled) -> str:
  """The compiled step's per-device memory estimate, one line."""
  sizes = compiled_memory(compiled)
  if sizes is None:
    return 'memory estimate: not available on this backend'
  return 'memory per device: ' + ', '.join(f'{k} {v / 2**20:.1f} MiB' for k, v in sizes.items())


def check_memory(compiled) -> None:
  """Refuses a compiled step that needs more memory per device than a device has, where that is
  known (`aot.memory_per_device`): the chip's memory for accelerators, the host's physical memory
  shared by its CPU devices."""
  from gated_attention import aot  # Imported here: aot builds on this module.
  sizes = compiled_memory(compiled)
  available, where = aot.memory_per_device(jax.local_devices()[0])
  if sizes is None or available is None or sizes['total'] <= available:
    return
  raise aot.CompileError(
      f'the train step needs {sizes["total"] / aot.GIB:,.1f} GiB per device (temporaries '
      f'{sizes["temporaries"] / aot.GIB:,.1f} GiB), more than the {available / aot.GIB:,.1f} GiB '
      f'of {where}. Lower data.seq_len or data.batch_size, raise train.microbatches, set '
      'model.remat, or shard over more devices (mesh.fsdp, mesh.tensor).')


def check_batch(config, mesh, training: bool = True) -> None:
  """The global batch (training) and the eval batch must split evenly over the batch mesh axes
  and microbatches, into one part per process (or per group of processes sharing rows)."""
  batch_ways = mesh.shape['data'] * mesh.shape['fsdp'] * mesh.shape['expert']
  batches = [('eval.batch_size', config.eval.batch_size, batch_ways)]
  if training:
    batches.insert(0, ('data.batch_size', config.data.batch_size,
                       batch_ways * config.train.microbatches))
  for key, size, ways in batches:
    if size % ways:
      raise config_lib.ConfigError(
          f'{key}={size} must be a multiple of mesh data x fsdp x expert = {batch_ways}'
          + (f' times train.microbatches = {config.train.microbatches}'
             if key == 'data.batch_size' and config.train.microbatches > 1 else '')
          + ('.' if training else ': give a --mesh whose data x fsdp x expert divides it.'))
    sharding_lib.batch_part(sharding_lib.batch_sharding(mesh), size)


@dataclasses.dataclass(frozen=True)
class TrainSetup:
  """What is known about the train state before any array exists: structure, shapes, shardings."""
  mesh: jax.sharding.Mesh
  graphdef: nnx.GraphDef
  abstract_variables: nnx.State
  optimizer: optax.GradientTransformation
  param_shardings: dict
  state_shardings: dict
  abstract_state: dict
  batch_sharding: jax.sharding.NamedSharding

  @property
  def num_params(self) -> int:
    return state_lib.num_params(self.abstract_variables)


def setup_train_state(config, mesh) -> TrainSetup:
  """Abstract model, optimizer and train state, with shardings from the logical-axis rules."""
  graphdef, abstract_variables = state_lib.abstract_model(config.model)
  param_shardings = state_lib.param_shardings(mesh, abstract_variables)
  optimizer = make_optimizer(config.train)
  abstract_params = nnx.to_pure_dict(abstract_variables)
  state_shardings = state_lib.train_state_shardings(mesh, optimizer, abstract_params,
                                                    param_shardings)
  abstract_state = state_lib.with_shardings(
      jax.eval_shape(lambda p: state_lib.init_train_state(p, optimizer), abstract_params),
      state_shardings)
  return TrainSetup(mesh, graphdef, abstract_variables, optimizer, param_shardings,
                    state_shardings, abstract_state,
                    sharding_lib.batch_sharding(mesh))


def initialize_train_state(config, setup: TrainSetup, params: dict | None = None) -> dict:
  """A fresh train state, created directly in its shardings: of `params` (an imported model's)
  when given, else of newly initialised ones."""
  with jax.set_mesh(setup.mesh):
    if params is None:
      params = state_lib.init_params(config.model, config.train.seed, setup.param_shardings)
    return jax.jit(lambda p: state_lib.init_train_state(p, setup.optimizer),
                   out_shardings=setup.state_shardings)(params)


def initialize_from_run(config, setup: TrainSetup) -> tuple[dict, init_from_lib.Plan]:
  """(fresh train state, plan) from the parameters train.init_from names: matched by
  `init_from.make_plan` (ConfigError for a changed shape, before any array is read), the rest
  initialised as in a new run; the source's optimizer state too with train.init_from_optimizer."""
  plan = init_from_lib.load_plan(config)
  if config.train.init_from_optimizer:
    state = init_from_lib.source_train_state(config, setup, plan)
  else:
    with jax.set_mesh(setup.mesh):
      fresh = state_lib.init_params(config.model, config.train.seed, setup.param_shardings)
      params = init_from_lib.initial_params(config, plan, setup.mesh, setup.param_shardings,
                                            fresh)
    state = initialize_train_state(config, setup, params)
  log(plan.describe() + ('; optimizer state loaded' if config.train.init_from_optimizer
                         else '; optimizer fresh'))
  return state, plan


def compile_train_step(config, setup: TrainSetup):
  """The train step, jitted with explicit shardings and donated state, compiled ahead of time."""
  step_fn = jax.jit(
      make_train_step(setup.graphdef, setup.optimizer, learning_rate_schedule(config.train),
                      config.model.moe, pad_id(config.data.tokenizer),
                      config.train.microbatches),
      in_shardings=(setup.state_shardings, setup.batch_sharding),
      out_shardings=(setup.state_shardings, sharding_lib.replicated(setup.mesh)),
      donate_argnums=0)
  tokens = jax.ShapeDtypeStruct((config.data.batch_size, config.data.seq_len + 1), jnp.int32,
                                sharding=setup.batch_sharding)
  with jax.set_mesh(setup.mesh):
    return step_fn.lower(setup.abstract_state, tokens).compile()


def mfu_of(config, setup: TrainSetup):
  """tokens_per_sec -> model FLOPs utilisation, or None where the chip's peak is unknown."""
  flops_per_token = flops_lib.flops_per_token(
      config.model, config.data.seq_len, state_lib.flat_param_shapes(setup.abstract_variables))
  peak = flops_lib.peak_flops_per_device(jax.devices()[0].device_kind,
                                         config.train.peak_flops_per_device)
  if not peak:
    return lambda tokens_per_sec: None
  return lambda tokens_per_sec: flops_per_token * tokens_per_sec / (peak * jax.device_count())


def is_loss_spike(recent_losses, loss: float, window: int, margin: float) -> bool:
  """True if loss exceeds the median of the last `window` losses by more than `margin`
  (relative); never before `window` losses have been seen."""
  recent = list(recent_losses)[-window:]
  return len(recent) == window and loss > float(np.median(recent)) * (1 + margin)


class StepLog:
  """Host-side bookkeeping of finished steps: progress bar, log lines, loss spikes, skipped
  steps, and the stop on a non-finite loss. Its `state()` is saved with each checkpoint."""

  def __init__(self, config, setup: TrainSetup, workdir, start_step: int, saved: dict | None,
               checkpointer: checkpoint_lib.Checkpointer):
    self.config, self.checkpointer, self.workdir = config, checkpointer, workdir
    saved = saved or {}
    self.skipped_steps = saved.get('skipped_steps', 0)
    self.loss_spikes = saved.get('loss_spikes', 0)
    self.recent_losses = collections.deque(saved.get('recent_losses', []),
                                           maxlen=config.train.loss_spike_window)
    self.mfu = mfu_of(config, setup)
    self.writer = MetricsWriter(workdir, start_step)
    self.progress = tqdm(total=config.train.steps, initial=start_step, desc='train', unit='step',
                         disable=jax.process_index() != 0, file=sys.stdout, dynamic_ncols=True)
    # (time, step) an interval's step time is measured from; the first step of a process is
    # left out of every interval, and logged without a time if it is logged.
    self.clock = (time.perf_counter(), start_step)
    self.first_step = start_step + 1
    self.last_record: dict = {}

  def exclude(self, seconds: float) -> None:
    """Leaves `seconds` of host work (a checkpoint save, while no step runs) out of the
    current interval's step time."""
    self.clock = (self.clock[0] + seconds, self.clock[1])

  def state(self) -> dict:
    return {'skipped_steps': self.skipped_steps, 'loss_spikes': self.loss_spikes,
            'recent_losses': list(self.recent_losses)}

  def kept(self) -> str:
    """Which checkpoint a run that stops now leaves behind, for its last message; a save still
    under way counts once it is complete (CheckpointError if it fails)."""
    self.checkpointer.wait()
    kept = self.checkpointer.latest_step()
    return (f'the last checkpoint, step {kept}, is intact in {self.checkpointer.directory}'
            if kept is not None else 'no checkpoint had been written yet')

  def finish(self, step: int, metrics) -> None:
    """Reads a dispatched step's metrics (the next step is already running) and logs them."""
    train_config = self.config.train
    metrics = jax.device_get(metrics)
    self.progress.update(1)
    if not metrics['finite']:
      if train_config.on_nonfinite == 'stop':
        raise TrainingError(
            f'Non-finite loss ({metrics["loss"]}) or gradient norm ({metrics["grad_norm"]}) at '
            f'step {step}; stopping: {self.kept()}. Lower train.learning_rate, or set '
            'train.on_nonfinite=skip to skip such updates.', step=step)
      self.skipped_steps += 1
      spike = False
    else:
      loss = float(metrics['loss'])
      spike = is_loss_spike(self.recent_losses, loss, train_config.loss_spike_window,
                            train_config.loss_spike_margin)
      self.loss_spikes += spike
      self.recent_losses.append(loss)
    now = time.perf_counter()
    if step == self.first_step:  # Not timed: its first run of the program is slower.
      self.clock = (now, step)
    if step % train_config.log_every and step != train_config.steps and not spike:
      return
    step_time = tokens_per_sec = mfu = None
    if step > self.clock[1]:
      step_time = (now - self.clock[0]) / (step - self.clock[1])
      tokens_per_sec = self.config.data.batch_size * self.config.data.seq_len / step_time
      mfu = self.mfu(tokens_per_sec)
      self.clock = (now, step)
    self.last_record = {
        'step': step, 'loss': float(metrics['loss']),
        'learning_rate': float(metrics['learning_rate']), 'grad_norm': float(metrics['grad_norm']),
        'tokens_per_sec': tokens_per_sec, 'step_time_s': step_time,
        'mfu': mfu, 'loss_spike': bool(spike),
        'loss_spikes': self.loss_spikes, 'skipped_steps': self.skipped_steps,
        **{name: float(metrics[name]) for name in ('load_balance_loss', 'router_z_loss')
           if name in metrics}}
    try:
      self.writer.write(self.last_record)
    except OSError as error:
      raise self._logs_failed(error) from None
    self.progress.set_postfix(loss=f'{self.last_record["loss"]:.3f}',
                              tok_s=f'{tokens_per_sec:,.0f}' if step_time else '–')
    if jax.process_index() == 0:
      self.progress.write(format_record(self.last_record))

  def _logs_failed(self, error: OSError) -> checkpoint_lib.CheckpointError:
    return checkpoint_lib.CheckpointError(
        f'Cannot write the logs in {self.workdir} ({error.strerror}); stopping: {self.kept()}.')

  def close(self) -> None:
    self.progress.close()
    try:
      self.writer.close()
    except OSError as error:
      raise self._logs_failed(error) from None


class StepProfile:
  """Traces train.profile_steps steps with jax.profiler, after this process's first
  train.profile_after steps, into WORKDIR/profile/process_N (view with XProf or TensorBoard's
  profile plugin), then logs where their time went (`profiling`: by category and op) and saves
  it as summary.json there. Each step is annotated with its number, so the viewer splits the
  trace by step."""

  def __init__(self, train_config, workdir: pathlib.Path, start_step: int, exclude, compiled):
    self.exclude_from_steps = exclude  # Takes the profiler's start and stop out of step times.
    self.compiled = compiled
    self.first = start_step + 1 + train_config.profile_after
    self.last = min(self.first + train_config.profile_steps - 1, train_config.steps)
    self.directory = workdir / 'profile' / f'process_{jax.process_index()}'
    self.tracing, self.since, self.traced_from, self.excluded = False, 0.0, 0.0, 0.0
    if train_config.profile_steps and self.first > train_config.steps:
      log(f'no profile: train.profile_after={train_config.profile_after} steps from step '
          f'{start_step + 1} reach past train.steps={train_config.steps}')
    elif not train_config.profile_steps:
      self.first = self.last = -1

  def step(self, step: int, state):
    """A context for running `step` on `state`: before the first profiled step, waits for the
    step before it (whose ops and time are not this profile's), then starts the trace."""
    if step == self.first:
      jax.block_until_ready(state)
      started = time.perf_counter()
      self.since = profiling.start_trace(self.directory)
      self.tracing = True
      self.traced_from = time.perf_counter()
      self.exclude_from_steps(self.traced_from - started)
    return jax.profiler.StepTraceAnnotation('train', step_num=step)

  def exclude(self, seconds: float) -> None:
    """Takes time the loop spent on other work (a checkpoint) out of the profiled steps'."""
    if self.tracing:
      self.excluded += seconds

  def finish(self, step: int, state) -> None:
    """After `step` is dispatched: the last profiled step is waited for, the trace written and
    summarized."""
    if step == self.last:
      jax.block_until_ready(state)
      started = time.perf_counter()
      steps = self.last - self.first + 1
      step_time_s = (started - self.traced_from - self.excluded) / steps
      self.close()
      try:
        summary = profiling.summarize_trace(self.directory, self.compiled.as_text(), steps,
                                            step_time_s, self.since)
        checkpoint_lib.write_whole(self.directory / 'summary.json',
                                   json.dumps(summary, indent=2))
        said = profiling.format_summary(summary)
      except Exception as error:  # A diagnostic: no failure of it may stop the training.
        said = f'no summary of it ({type(error).__name__}): {error}'
      self.exclude_from_steps(time.perf_counter() - started)
      log(f'profile of steps {self.first}-{self.last} in {self.directory.parent}\n{said}')

  def close(self) -> None:
    if self.tracing:
      self.tracing = False
      jax.profiler.stop_trace()


def restore_or_initialize(config, setup: TrainSetup, workdir: pathlib.Path, checkpointer,
                          iterator, allow_data_change: bool, fingerprints: dict):
  """(start step, train state, saved loop state or None, what `record_start` writes). From the
  latest complete checkpoint when there is one: its config and data's fingerprints checked
  against `config` and `fingerprints` (`resume.check_resume`), the data iterator moved
  to its position (translated when the data order changed); else a fresh state at step 0, of
  train.init_from's parameters when it names a source."""
  step = checkpointer.latest_step()
  loop_state, changes, position, source = None, {}, None, None
  if step is None and config.train.init_from:
    state, plan = initialize_from_run(config, setup)
    changes, source = resume_lib.differences(plan.source_config,
                                             resume_lib.plain(config)), plan.record()
  elif step is None:
    state = initialize_train_state(config, setup)
  else:
    if config.train.init_from:
      log(f'train.init_from={config.train.init_from!r} applies to a new run only: resuming '
          'from this run\'s own checkpoint')
    if step > config.train.steps:
      raise config_lib.ConfigError(
          f'train.steps={config.train.steps} is below step {step}, where the run in {workdir} '
          'already is: raise train.steps to train on, or use another --workdir.')
    saved_config, host_state = checkpointer.saved_config(step), checkpointer.host_state(step)
    params_only = bool(host_state.get('params_only'))  # An imported model: no data position.
    changes = resume_lib.check_resume(
        saved_config, config, checkpointer.directory / str(step), allow_data_change or params_only,
        *((host_state.get(key), fingerprints[key])  # None in checkpoints from before them.
          for key in ('data_fingerprint', 'heldout_fingerprint')))
    if params_only:  # A fresh optimizer; either layer layout continues in either.
      reader = checkpoint_lib.Checkpointer(workdir, read_only=True)  # Restores, never saves.
      state = initialize_train_state(config, setup, state_lib.restore_params(
          reader, step, setup.abstract_state['params'], config.model.scan_layers))
      reader.close()
      log(f'continuing from the parameters in {checkpointer.directory / str(step)}')
      changes = {**changes, 'optimizer': ('imported parameters only', 'fresh')}
    else:
      state, loop_state, position = _resume(config, setup, checkpointer, iterator, step,
                                            saved_config, changes)
  return step or 0, state, loop_state, (changes, position, source)


def record_start(workdir: pathlib.Path, config, step: int, start: tuple) -> None:
  """Records a start that will train (its step compiled and fitting) in WORKDIR/history.jsonl
  and config.json; start: (changes, data position, init_from source) of restore_or_initialize."""
  if jax.process_index() == 0:
    checkpoint_lib.save_config(workdir, config)
    resume_lib.append_history(workdir, step, *start)


def _resume(config, setup: TrainSetup, checkpointer, iterator, step: int, saved_config: dict,
            changes: dict):
  """(train state, loop state, data translation or None) of checkpoint `step`, in this config's
  layer layout; the data iterator set to its position, translated when the data order changed."""
  state, saved = checkpointer.restore(step, state_lib.in_layout(
      setup.abstract_state, saved_config['model']['scan_layers']))
  state = state_lib.to_layout(state, config.model.scan_layers, setup.state_shardings)
  iterator_state, position = saved['iterator'], None
  if any(resume_lib.policy(key) == resume_lib.DATA_ORDER for key in changes):
    saved_batch_size = saved_config['data']['batch_size']
    iterator_state, consumed, repeated = data_lib.translate_position(
        iterator_state, saved_batch_size, config.data.batch_size)
    position = {'examples_consumed': consumed, 'batch_size': config.data.batch_size,
                'batches': iterator_state['next_index'], 'examples_repeated': repeated}
    log(f'data order changed: continuing {consumed:,} examples into the new order (batch '
        f'{position["batches"]:,} of {config.data.batch_size}); {repeated} example(s) of the '
        'old position are seen again')
  iterator.set_state(iterator_state)
  log(f'resumed from {checkpointer.directory / str(step)}'
      + (f' with {resume_lib.describe(changes)}' if changes else ''))
  return state, saved['loop'], position


def train(config, workdir, allow_data_change: bool = False) -> dict:
  """Trains (or resumes) the run in `workdir`, which it holds alone throughout (`workdir.hold`);
  returns the last logged record, with 'preempted': True added when SIGTERM or Ctrl-C stopped
  the run early (after saving it). allow_data_change: a resume may change the data order
  (`resume.RESUME_POLICY`)."""
  config_lib.validate(config)
  unread = config_lib.unread_keys(config)
  if unread:
    warn(f'{", ".join(unread)}: not read by this run, so changed nothing (gate keys need '
        'a gate position, MoE keys model.moe.num_experts > 0, data.bigram_backcopy keys that '
        'data source).')
  if config.model.dtype == 'float16':
    raise config_lib.ConfigError(
        'model.dtype=float16 does not train here: this trainer does no loss scaling, and float16 '
        'gradients underflow without it (7% off at 16 x 2,048 tokens per step). Train in '
        'bfloat16 or float32; float16 serves evaluation and generation.')
  if config.model.param_dtype == 'float16':
    raise config_lib.ConfigError(
        'model.param_dtype=float16 does not train here: the optimizer state would be float16 '
        "too, where Adam's epsilon (1e-8) is 0, so a parameter whose gradient is 0 becomes NaN. "
        'Keep parameters in float32 or bfloat16; float16 serves evaluation and generation.')
  with workdir_lib.hold(workdir):
    # Watched from the start: a preemption while the run starts (data, restore, a compile of
    # minutes on a pod) stops it after its first step, saved like any other.
    preemption = PreemptionWatch()
    try:
      return _train(config, pathlib.Path(workdir), allow_data_change, preemption)
    finally:
      # Only now: a SIGTERM or Ctrl-C while the last save is in flight must not kill it.
      preemption.close()


def _train(config, workdir: pathlib.Path, allow_data_change: bool,
           preemption: PreemptionWatch) -> dict:
  train_config = config.train

  # Phase 1: mesh.
  mesh = sharding_lib.make_mesh(config.mesh)
  check_batch(config, mesh)
  log(f'mesh {dict(mesh.shape)} over {jax.device_count()} {jax.devices()[0].device_kind} '
      f'device(s), {jax.process_count()} process(es)')

  # Phase 2: data: this process's part of each global batch.
  vocab_size = config.model.vocab_size
  part = sharding_lib.batch_part(sharding_lib.batch_sharding(mesh),
                                 config.data.batch_size)
  train_source = data_lib.load_split(config.data, 'train', vocab_size)
  heldout_source = data_lib.load_split(config.data, 'heldout', vocab_size)
  # Saved with every checkpoint and compared on resume.
  fingerprints = {'data_fingerprint': data_lib.fingerprint(train_source),
                  'heldout_fingerprint': data_lib.fingerprint(heldout_source)}
  log(f'training data: {fingerprints["data_fingerprint"]}; held out: '
      f'{fingerprints["heldout_fingerprint"]}')
  dataset = data_lib.train_dataset(train_source, config.data.batch_size, train_config.seed,
                                   *part)
  # Fails now, not after training, if the held-out split cannot fill one eval batch.
  data_lib.heldout_batches(heldout_source, config.eval.batch_size, config.eval.batches, 0, 1)

  # Phase 3: abstract state and shardings.
  setup = setup_train_state(config, mesh)

  # Phase 4: init or restore.
  checkpointer = checkpoint_lib.Checkpointer(workdir, keep=train_config.keep_checkpoints)
  iterator = iter(dataset)
  start_step, state, loop_state, start = restore_or_initialize(
      config, setup, workdir, checkpointer, iterator, allow_data_change, fingerprints)

  # Phase 5: compile.
  with CompileTimer() as compile_timer:
    compiled = compile_train_step(config, setup)
  log(f'{setup.num_params:,} parameters; train step {compile_timer}; '
      f'{describe_memory(compiled)}')
  check_memory(compiled)
  record_start(workdir, config, start_step, start)

  # Phase 6: loop. Metrics of step n are read after step n + 1 is dispatched, so the host
  # never stalls the device; a step is read before any checkpoint that would include it.
  step_log = StepLog(config, setup, workdir, start_step, loop_state, checkpointer)
  profile = StepProfile(train_config, workdir, start_step, step_log.exclude, compiled)
  pending, preempted = None, False
  preemption.stepping = True
  try:
    for step in range(start_step + 1, train_config.steps + 1):
      checkpointer.raise_if_save_failed()
      with profile.step(step, state):
        state, metrics = compiled(state, global_batch(next(iterator), setup.batch_sharding, part))
      profile.finish(step, state)
      if pending is not None:
        step_log.finish(*pending)
      pending = (step, metrics)
      preempted = preemption.reached(step)
      if step % train_config.checkpoint_every == 0 or step == train_config.steps or preempted:
        step_log.finish(*pending)
        pending = None
        started = time.perf_counter()
        checkpointer.save(step, state, {'iterator': iterator.get_state(),
                                        **fingerprints,
                                        'loop': step_log.state()}, config)
        saving = time.perf_counter() - started
        step_log.exclude(saving)
        profile.exclude(saving)
      if preempted:
        break
  finally:
    try:
      profile.close()  # A run stopped inside the profiled steps keeps the trace so far.
      step_log.close()
    finally:
      checkpointer.close()  # If its save failed, that is the error reported.
  if preempted:
    log(f'{preemption.describe()}: saved step {step}; run the same command to resume')
  else:
    log(f'done: step {train_config.steps}, {step_log.loss_spikes} loss spike(s), '
        f'{step_log.skipped_steps} skipped step(s); checkpoints in {checkpointer.directory}')
  return {**step_log.last_record, 'preempted': preempted}
