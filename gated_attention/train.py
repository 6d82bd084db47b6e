"""The trainer. `train(config, workdir)` reads top to bottom in phases:

  1. mesh           build the device mesh from config.mesh
  2. data           the training split as a seeded grain pipeline, this process's share
  3. shardings      abstract model and train state, their shardings from logical axes
  4. init/restore   resume from the latest complete checkpoint in workdir, else initialise
  5. compile        lower and compile the train step ahead of time; print its memory
  6. loop           step, log, checkpoint; stop cleanly on a non-finite loss

Process 0 alone writes logs and the config; every process reads its own data shard and takes
part in checkpoint saves (orbax coordinates them).
"""

import functools
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
from gated_attention import sharding as sharding_lib
from gated_attention import state as state_lib
from gated_attention.metrics import MetricsWriter, format_record
from gated_attention.optimizer import learning_rate_schedule, make_optimizer


class TrainingError(RuntimeError):
  """The run cannot go on (for example a non-finite loss); the message says why and what is kept."""


def cross_entropy(logits: jax.Array, targets: jax.Array) -> tuple[jax.Array, jax.Array]:
  """(summed next-token loss, number of non-PAD targets) for float32 logits [b, t, v]."""
  losses = optax.softmax_cross_entropy_with_integer_labels(logits, targets)
  mask = targets != data_lib.PAD_ID
  return jnp.sum(jnp.where(mask, losses, 0.0)), jnp.sum(mask)


def make_train_step(graphdef, optimizer, schedule):
  """train_step(state, tokens [batch, seq_len + 1]) -> (state, metrics).

  A step whose loss or gradient norm is not finite leaves parameters and optimizer state as
  they were (its `finite` metric is False); the loop decides whether to stop or go on.
  """
  def train_step(state, tokens):
    def loss_fn(params):
      logits = nnx.merge(graphdef, params)(tokens[:, :-1])
      loss_sum, num_tokens = cross_entropy(logits, tokens[:, 1:])
      return loss_sum / jnp.maximum(num_tokens, 1)

    loss, grads = jax.value_and_grad(loss_fn)(state['params'])
    grad_norm = optax.tree.norm(grads)
    updates, opt_state = optimizer.update(grads, state['opt_state'], state['params'])
    updated = {'step': state['step'] + 1, 'params': optax.apply_updates(state['params'], updates),
               'opt_state': opt_state}
    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
    new_state = jax.tree.map(lambda new, old: jnp.where(finite, new, old), updated, state)
    metrics = {'loss': loss, 'grad_norm': grad_norm, 'finite': finite,
               'learning_rate': schedule(state['step'])}
    return new_state, metrics

  return train_step


def global_batch(local_tokens: np.ndarray, batch_sharding) -> jax.Array:
  """Assembles the global batch from each process's share."""
  return jax.make_array_from_process_local_data(batch_sharding, local_tokens)


def describe_memory(compiled) -> str:
  """The compiled step's per-device memory estimate, one line."""
  analysis = compiled.memory_analysis()
  if analysis is None:
    return 'memory estimate: not available on this backend'
  sizes = {'arguments': analysis.argument_size_in_bytes, 'outputs': analysis.output_size_in_bytes,
           'temporaries': analysis.temp_size_in_bytes,
           'aliased': -analysis.alias_size_in_bytes}
  total = sum(sizes.values())
  return ('memory per device: ' + ', '.join(f'{k} {v / 2**20:.1f} MiB' for k, v in sizes.items())
          + f', total {total / 2**20:.1f} MiB')


def check_batch(config, mesh) -> None:
  """The global batch must split evenly over the batch mesh axes and over processes."""
  batch_ways = mesh.shape['data'] * mesh.shape['fsdp']
  for key in ('data.batch_size', 'eval.batch_size'):
    size = config.data.batch_size if key == 'data.batch_size' else config.eval.batch_size
    if size % batch_ways or size % jax.process_count():
      raise config_lib.ConfigError(
          f'{key}={size} must be a multiple of mesh data x fsdp = {batch_ways} and of the '
          f'process count {jax.process_count()}.')


def log(message: str) -> None:
  if jax.process_index() == 0:
    print(message, flush=True)


def train(config, workdir) -> dict:
  """Trains (or resumes) the run in `workdir`; returns the last logged record."""
  config_lib.validate(config)
  workdir = pathlib.Path(workdir)
  train_config = config.train

  # Phase 1: mesh.
  mesh = sharding_lib.make_mesh(config.mesh)
  check_batch(config, mesh)
  log(f'mesh {dict(mesh.shape)} over {jax.device_count()} {jax.devices()[0].device_kind} '
      f'device(s), {jax.process_count()} process(es)')

  # Phase 2: data.
  dataset = data_lib.train_dataset(
      data_lib.load_split(config.data, 'train'), config.data.batch_size, train_config.seed,
      jax.process_index(), jax.process_count())
  batch_sharding = sharding_lib.named_sharding(mesh, ('batch', 'length'))

  # Phase 3: abstract state and shardings.
  graphdef, abstract_variables = state_lib.abstract_model(config.model)
  param_shardings = state_lib.param_shardings(mesh, abstract_variables)
  optimizer, schedule = make_optimizer(train_config), learning_rate_schedule(train_config)
  abstract_params = nnx.to_pure_dict(abstract_variables)
  state_shardings = state_lib.train_state_shardings(mesh, optimizer, abstract_params,
                                                    param_shardings)
  init_state = functools.partial(state_lib.init_train_state, optimizer=optimizer)
  abstract_state = state_lib.with_shardings(jax.eval_shape(init_state, abstract_params),
                                            state_shardings)

  # Phase 4: init or restore.
  if jax.process_index() == 0:
    checkpoint_lib.save_config(workdir, config)
  checkpointer = checkpoint_lib.Checkpointer(workdir, keep=train_config.keep_checkpoints)
  iterator = iter(dataset)
  start_step = checkpointer.latest_step()
  if start_step is None:
    start_step = 0
    with jax.set_mesh(mesh):
      params = state_lib.init_params(config.model, train_config.seed, param_shardings)
      state = jax.jit(init_state, out_shardings=state_shardings)(params)
  else:
    state, data_state = checkpointer.restore(start_step, abstract_state)
    iterator.set_state(data_state)
    log(f'resumed from {checkpointer.directory / str(start_step)}')
  num_params = sum(int(np.prod(shape)) for _, shape in state_lib.flat_param_shapes(
      abstract_variables))

  # Phase 5: compile.
  step_fn = jax.jit(make_train_step(graphdef, optimizer, schedule),
                    in_shardings=(state_shardings, batch_sharding),
                    out_shardings=(state_shardings, sharding_lib.replicated(mesh)),
                    donate_argnums=0)
  tokens_shape = (config.data.batch_size, config.data.seq_len + 1)
  started = time.perf_counter()
  with jax.set_mesh(mesh):
    compiled = step_fn.lower(
        abstract_state, jax.ShapeDtypeStruct(tokens_shape, jnp.int32, sharding=batch_sharding)
    ).compile()
  log(f'{num_params:,} parameters; train step compiled in {time.perf_counter() - started:.1f}s; '
      f'{describe_memory(compiled)}')

  # Phase 6: loop.
  tokens_per_step = config.data.batch_size * config.data.seq_len
  flops_per_token = flops_lib.flops_per_token(
      config.model, config.data.seq_len, state_lib.flat_param_shapes(abstract_variables))
  peak_flops = flops_lib.peak_flops_per_device(jax.devices()[0].device_kind,
                                               train_config.peak_flops_per_device)
  writer = MetricsWriter(workdir)
  progress = tqdm(total=train_config.steps, initial=start_step, desc='train', unit='step',
                  disable=jax.process_index() != 0, file=sys.stdout, dynamic_ncols=True)
  clock = {'time': time.perf_counter(), 'step': start_step}
  skipped_steps = 0
  last_record: dict = {}

  def finish_step(step: int, metrics) -> None:
    """Reads a dispatched step's metrics (the next step already runs), logs, stops on NaN."""
    nonlocal skipped_steps, last_record
    metrics = jax.device_get(metrics)
    progress.update(1)
    if not metrics['finite']:
      if train_config.on_nonfinite == 'stop':
        kept = checkpointer.latest_step()
        kept = (f'the last checkpoint, step {kept}, is intact in {checkpointer.directory}'
                if kept is not None else 'no checkpoint had been written yet')
        raise TrainingError(
            f'Non-finite loss ({metrics["loss"]}) or gradient norm ({metrics["grad_norm"]}) at '
            f'step {step}; stopping: {kept}. Lower train.learning_rate, or set '
            'train.on_nonfinite=skip to skip such updates.')
      skipped_steps += 1
    if step % train_config.log_every and step != train_config.steps:
      return
    now = time.perf_counter()
    step_time = (now - clock['time']) / max(step - clock['step'], 1)
    clock.update(time=now, step=step)
    tokens_per_sec = tokens_per_step / step_time
    last_record = {
        'step': step, 'loss': float(metrics['loss']),
        'learning_rate': float(metrics['learning_rate']), 'grad_norm': float(metrics['grad_norm']),
        'tokens_per_sec': tokens_per_sec, 'step_time_s': step_time,
        'mfu': (flops_per_token * tokens_per_sec / (peak_flops * jax.device_count())
                if peak_flops else None),
        'skipped_steps': skipped_steps}
    writer.write(last_record)
    progress.set_postfix(loss=f'{last_record["loss"]:.3f}', tok_s=f'{tokens_per_sec:,.0f}')
    if jax.process_index() == 0:
      progress.write(format_record(last_record))

  pending = None
  try:
    for step in range(start_step + 1, train_config.steps + 1):
      tokens = global_batch(next(iterator), batch_sharding)
      state, metrics = compiled(state, tokens)
      if pending is not None:
        finish_step(*pending)
      pending = (step, metrics)
      if step % train_config.checkpoint_every == 0 and step != train_config.steps:
        finish_step(*pending)  # Never save a step before its loss is known to be finite.
        pending = None
        checkpointer.save(step, state, iterator.get_state())
    if pending is not None:
      finish_step(*pending)
    if checkpointer.latest_step() != train_config.steps:
      checkpointer.save(train_config.steps, state, iterator.get_state())
  finally:
    checkpointer.wait()
    checkpointer.close()
    progress.close()
    writer.close()
  return last_record
