"""Speed of the compiled train step, alone (random tokens, no input pipeline), per gate variant:
the paper claims the G1 gate costs under 2% wall time."""

import time

import jax
import numpy as np

from gated_attention import config as config_lib
from gated_attention import sharding as sharding_lib
from gated_attention.train import (check_batch, compile_train_step, compiled_memory,
                                   initialize_train_state, mfu_of, setup_train_state)


def benchmark_train_step(config, steps: int, trials: int = 3) -> dict:
  """Median over `trials` of the mean step time over `steps` steps, after a warm-up step."""
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
  state, metrics = compiled(state, tokens)
  jax.block_until_ready(metrics)
  step_times = []
  for _ in range(trials):
    started = time.perf_counter()
    for _ in range(steps):
      state, metrics = compiled(state, tokens)
    jax.block_until_ready(metrics)
    step_times.append((time.perf_counter() - started) / steps)
  step_time = float(np.median(step_times))
  tokens_per_sec = config.data.batch_size * config.data.seq_len / step_time
  return {'params': setup.num_params, 'step_time_s': step_time, 'tokens_per_sec': tokens_per_sec,
          'mfu': mfu_of(config, setup)(tokens_per_sec), 'compile_s': compile_s,
          'memory_bytes': compiled_memory(compiled), 'device_kind': jax.devices()[0].device_kind,
          'devices': jax.device_count()}
