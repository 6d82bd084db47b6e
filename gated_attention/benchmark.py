"""Speed and memory, measured: the compiled train step alone (random tokens, no input pipeline)
for any config, one config's step against another's taken in alternation, the compiled memory
of one attention layer by implementation and length, and the PyTorch reference's step beside it
(run in its own interpreter, never imported)."""

import pathlib
import re
import subprocess
import tempfile
import time
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from gated_attention import aot
from gated_attention import attention as attention_lib
from gated_attention import config as config_lib
from gated_attention import profiling
from gated_attention import sharding as sharding_lib
from gated_attention.model import mlp_width
from gated_attention.train import (check_batch, compile_train_step, compiled_memory,
                                   initialize_train_state, mfu_of, setup_train_state)


# Untimed steps before the trials, as many as the PyTorch reference's: the first step faults its
# working set into memory (about 1.7x a later step's time on the `small` shape).
WARMUP_STEPS = 3


class PreparedStep(NamedTuple):
  """A config's compiled train step with its state and a batch of random tokens; `run()` takes
  one step and waits for it."""
  setup: object
  compiled: object
  state: dict
  tokens: jax.Array
  compile_s: float

  def run(self) -> 'PreparedStep':
    return run_steps(self, 1)[0]


def prepare_train_step(config) -> PreparedStep:
  """Validates `config`, builds its state and compiles its train step (timed)."""
  config_lib.validate(config)
  mesh = sharding_lib.make_mesh(config.mesh)
  check_batch(config, mesh)
  setup = setup_train_state(config, mesh)
  state = initialize_train_state(config, setup)
  started = time.perf_counter()
  compiled = compile_train_step(config, setup)
  compile_s = time.perf_counter() - started
  shape = (config.data.batch_size, config.data.seq_len + 1)
  tokens = jax.device_put(np.random.default_rng(0).integers(0, 256, shape, dtype=np.int32),
                          setup.batch_sharding)
  return PreparedStep(setup, compiled, state, tokens, compile_s)


def run_steps(prepared: PreparedStep, steps: int) -> tuple[PreparedStep, float]:
  """Takes `steps` steps, dispatched back to back, waiting only for the last: the state after
  them and the mean seconds per step."""
  started = time.perf_counter()
  state, metrics = prepared.state, None
  for _ in range(steps):
    state, metrics = prepared.compiled(state, prepared.tokens)
  jax.block_until_ready(metrics)
  return prepared._replace(state=state), (time.perf_counter() - started) / steps


def benchmark_train_step(config, steps: int, trials: int = 3, profile_steps: int = 0,
                         profile_dir: pathlib.Path | None = None) -> dict:
  """The median trial (the lower of the middle two for an even count: always a measured trial)
  of `trials`, each the mean step time over `steps` steps, after WARMUP_STEPS steps; every trial's
  time beside it (`trial_step_times_s`). profile_steps > 0: then that many more steps traced
  into profile_dir (default: a new temporary folder), and where their time went
  (`profiling.summarize_trace`) as `profile`."""
  prepared = prepare_train_step(config)
  for _ in range(WARMUP_STEPS):
    prepared = prepared.run()
  step_times = []
  for _ in range(trials):
    prepared, step_time = run_steps(prepared, steps)
    step_times.append(step_time)
  step_time = lower_median(step_times)
  tokens_per_sec = config.data.batch_size * config.data.seq_len / step_time
  setup = prepared.setup
  result = {'params': setup.num_params, 'step_time_s': step_time,
            'trial_step_times_s': step_times, 'tokens_per_sec': tokens_per_sec,
            'mfu': mfu_of(config, setup)(tokens_per_sec), 'compile_s': prepared.compile_s,
            'memory_bytes': compiled_memory(prepared.compiled),
            'device_kind': jax.devices()[0].device_kind, 'devices': jax.device_count()}
  if profile_steps:
    profile_dir = profile_dir or pathlib.Path(tempfile.mkdtemp(prefix='gated_attention_profile_'))
    since = profiling.start_trace(profile_dir)
    try:
      prepared, traced_step_time = run_steps(prepared, profile_steps)
    finally:
      jax.profiler.stop_trace()
    result['profile'] = profiling.summarize_trace(profile_dir, prepared.compiled.as_text(),
                                                  profile_steps, traced_step_time, since)
  return result


def interleaved_ratios(step, reference_step, pairs: int, clock=time.perf_counter) -> list[float]:
  """Times `pairs` pairs of calls of two zero-argument step functions in alternation, the first
  of a pair taking turns (step, reference; reference, step; ...): each pair's step time over its
  reference time. Drift of the machine's speed reaches both sides of a ratio alike."""
  ratios = []
  for pair in range(pairs):
    times = {}
    for name, run in ((('step', step), ('reference', reference_step)) if pair % 2 == 0
                      else (('reference', reference_step), ('step', step))):
      started = clock()
      run()
      times[name] = clock() - started
    ratios.append(times['step'] / times['reference'])
  return ratios


def interleaved_overhead(config, reference_config, pairs: int) -> dict:
  """A config's step time over a reference config's, both compiled in this process and their
  steps taken in alternation (`interleaved_ratios`) after WARMUP_STEPS each: the median ratio
  (a measured one), its quartiles, and how many pairs. Both steps are in memory at once."""
  prepared = {'step': prepare_train_step(config),
              'reference': prepare_train_step(reference_config)}

  def stepper(name):
    def run():
      prepared[name] = prepared[name].run()
    return run

  step, reference = stepper('step'), stepper('reference')
  interleaved_ratios(step, reference, WARMUP_STEPS)
  ratios = interleaved_ratios(step, reference, pairs)
  return {'ratio': lower_median(ratios),
          'ratio_quartiles': np.percentile(ratios, [25, 75]).tolist(), 'pairs': pairs}


def lower_median(values, key=None):
  """The median (by `key`), the lower of the middle two for an even count: always a measured
  value."""
  return sorted(values, key=key)[(len(values) - 1) // 2]


def paired_ratio(times, reference_times) -> float:
  """The median over rounds of a time over the reference's time in the same round: the
  comparison a machine whose speed drifts between rounds disturbs least."""
  return lower_median([measured / reference
                       for measured, reference in zip(times, reference_times)])


def check_memory_measurable(impls, lengths) -> None:
  """Refuses what the attention memory table cannot measure as named: an unknown
  implementation, one whose working memory XLA's memory analysis cannot see, a length below 1,
  or one that splash would leave to chunked."""
  unknown = [impl for impl in impls if impl not in config_lib.ATTENTION_IMPLS or impl == 'auto']
  if unknown:
    raise config_lib.ConfigError(
        f'--attention_impls: {", ".join(unknown)} is not an implementation; choose from '
        f'{[impl for impl in config_lib.ATTENTION_IMPLS if impl != "auto"]}.')
  if min(lengths) < 1:
    raise config_lib.ConfigError(f'--attention_memory: {min(lengths)} is not a length; give '
                                 'lengths of at least 1 token.')
  uneven = [length for length in lengths if length % config_lib.SPLASH_BLOCK]
  if 'splash' in impls and uneven:
    raise config_lib.ConfigError(
        f'--attention_memory: splash runs in blocks of {config_lib.SPLASH_BLOCK} tokens, and '
        f'{", ".join(map(str, uneven))} is not a multiple (chunked would run in its place).')
  if 'cpu_flash' in impls:
    raise config_lib.ConfigError(
        '--attention_impls: cpu_flash keeps its working memory inside the kernel, which XLA\'s '
        'memory analysis does not see (per thread: [64, L] logits and its KV head); compare '
        'xla, dot_product, chunked or splash.')


def attention_memory(impl: str, length: int, heads: int = 8, head_dim: int = 64,
                     batch: int = 1, dtype=jnp.float32, devices=None) -> int | None:
  """Compiled temporary bytes per device of one attention layer's forward and backward pass,
  `batch` sequences per device (compiled, never run: lengths far beyond this machine's memory
  are fine); None where it cannot fit a device: the compiler says so (libtpu), or the
  temporaries exceed an accelerator's memory (XLA's GPU compiler compiles them anyway). devices:
  those to compile for, the batch split over them (default: one local device;
  `aot.topology_devices` gives a TPU slice's or GPUs')."""
  check_memory_measurable([impl], [length])
  devices = list(devices or jax.devices()[:1])
  mesh = sharding_lib.make_mesh(dict(data=1, fsdp=-1, tensor=1, expert=1), devices)
  shape = jax.ShapeDtypeStruct(
      (batch * len(devices), length, heads, head_dim), dtype,
      sharding=sharding_lib.named_sharding(mesh, ('batch', 'length', 'heads', 'head_dim')))
  loss = lambda q, k, v: jnp.sum(attention_lib.attention(q, k, v, impl).astype(jnp.float32))
  with jax.set_mesh(mesh):
    step = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))
    try:
      temporaries = step.lower(shape, shape, shape).compile().memory_analysis().temp_size_in_bytes
    except jax.errors.JaxRuntimeError as error:
      if 'RESOURCE_EXHAUSTED' in str(error):
        return None
      raise
  memory = aot.device_memory(devices[0].device_kind) if devices[0].platform != 'cpu' else None
  return None if memory is not None and temporaries > memory else temporaries


# The PyTorch reference's fixed shape: a config that differs in any of these is not its model.
TORCH_REFERENCE_FIXED = {'vocab_size': 384, 'tie_embeddings': True, 'qk_norm': True,
                         'norm_plus_one': False, 'sandwich_norm': False, 'rope_theta': 10_000.0,
                         'rope_fraction': 1.0, 'dtype': 'float32'}


def check_torch_reference_shape(config) -> None:
  """Refuses a config the PyTorch reference cannot take the shape of (its vocabulary, norms,
  RoPE and dtype are fixed; no experts), so its row is always the same model."""
  model = config.model
  differ = [f'model.{key}={model[key]!r} (the reference: {value!r})'
            for key, value in TORCH_REFERENCE_FIXED.items() if model[key] != value]
  if model.moe.num_experts:
    differ.append(f'model.moe.num_experts={model.moe.num_experts} (the reference: dense)')
  if differ:
    raise config_lib.ConfigError(
        '--torch_python times a PyTorch model of a fixed shape, which this config is not: '
        + ', '.join(differ) + '. Benchmark such a config without --torch_python.')


def torch_reference(python: str, script: str, config, compile_mode: bool = False,
                    timeout_s: float = 1200) -> dict:
  """Runs the PyTorch reference of the same shape (`script`, e.g. ../shared/bench/torch_lm.py)
  under `python` (its own virtual environment) and parses its one-line result."""
  model, data = config.model, config.data
  gate = config_lib.canonical_gate_position(model.gate.position)
  check_torch_reference_shape(config)
  env = {'D': model.d_model, 'LAYERS': model.num_layers, 'HEADS': model.num_heads,
         'KV_HEADS': model.num_kv_heads, 'HEAD_DIM': model.head_dim, 'MLP': mlp_width(model),
         'SEQ': data.seq_len, 'BATCH': data.batch_size,
         'GATE': 'none' if gate == 'none' else model.gate.granularity,
         'COMPILE': int(compile_mode)}
  result = subprocess.run([python, script], capture_output=True, text=True, timeout=timeout_s,
                          env={'PATH': '/usr/bin:/bin', **{k: str(v) for k, v in env.items()}})
  line = result.stdout.strip().splitlines()[-1] if result.stdout.strip() else ''
  found = re.search(r'params=([\d,]+) ms/step=([\d.]+)', line)
  if result.returncode or not found:
    said = (result.stderr or line).strip().splitlines() or ['no output']
    raise config_lib.ConfigError(f'the PyTorch reference {script} failed under {python} (exit '
                                 f'status {result.returncode}): {said[-1]}')
  step_time = float(found.group(2)) / 1e3
  return {'params': int(found.group(1).replace(',', '')), 'step_time_s': step_time,
          'tokens_per_sec': data.batch_size * data.seq_len / step_time, 'line': line}


