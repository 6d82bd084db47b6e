"""Small configs and model builders shared by the tests, and the command lines of tiny runs."""

import os
import pathlib
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from gated_attention import checkpoint as checkpoint_lib
from gated_attention import config as config_lib
from gated_attention import launch, layers, sharding
from gated_attention import state as state_lib
from gated_attention.evaluate import load_params
from gated_attention.model import Attention, Transformer

# --config.* flags of a model and batch small enough to train a step in milliseconds.
TINY_FLAGS = {
    'model.d_model': 32, 'model.num_layers': 2, 'model.num_heads': 4, 'model.num_kv_heads': 2,
    'model.head_dim': 8, 'model.mlp_dim': 64, 'data.seq_len': 32, 'data.batch_size': 8,
    'eval.batch_size': 8, 'eval.batches': 2, 'eval.analysis_batches': 1, 'train.warmup_steps': 1,
    'train.log_every': 1,
}
REPO = pathlib.Path(__file__).resolve().parents[1]
# jax's CUDA plugin for compiling for NVIDIA GPUs (requirements-gpu-aot.txt), which `.ci/run`
# installs here and only the command lines that compile for GPUs put on their path: its libraries
# announce on every import of jax that they found no GPU.
GPU_AOT = REPO / '.gpu-aot'
needs_cuda_plugin = pytest.mark.skipif(
    not (GPU_AOT / 'jax_plugins').is_dir(),
    reason='the CUDA plugin is not installed in .gpu-aot (pip install --no-deps --target .gpu-aot '
    '-r requirements-gpu-aot.txt)')


def model_config(gate: str = 'g1_elementwise', gate_overrides=None, **overrides):
  """A tiny model config: 2 layers, d_model 32, 4 query heads over 2 KV heads, head_dim 8."""
  config = config_lib.base_config('tiny', gate)
  config.model.update(dict(d_model=32, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=8,
                           mlp_dim=64, init_std=0.2, rope_fraction=0.5, attention_impl='xla'))
  config.model.update(overrides)
  config.model.gate.update(gate_overrides or {})
  config_lib.validate(config)
  return config.model


def attention(model_cfg, seed: int = 0) -> Attention:
  return Attention(model_cfg, rngs=nnx.Rngs(seed))


def transformer(model_cfg, seed: int = 0) -> Transformer:
  return Transformer(model_cfg, rngs=nnx.Rngs(seed))


def rope(length: int, model_cfg):
  """(sin, cos) tables for positions 0..length-1 of a model config."""
  return layers.rope_tables(jnp.arange(length)[None], *layers.rope_frequencies(
      int(model_cfg.head_dim * model_cfg.rope_fraction), model_cfg.rope_theta,
      model_cfg.rope_scaling))


def random_tokens(seed: int, batch: int = 2, length: int = 12, vocab: int = 259):
  return jnp.asarray(np.random.default_rng(seed).integers(0, vocab, (batch, length)), jnp.int32)


def run_config(steps: int = 8, gate: str = 'g1_elementwise', **train):
  """A full experiment config small enough to train in seconds on the embedded corpus."""
  config = config_lib.base_config('tiny', gate)
  config.model.update(dict(d_model=32, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=8,
                           mlp_dim=64))
  config.data.update(seq_len=32, batch_size=8)
  config.eval.update(batches=2, batch_size=8, analysis_batches=1)
  config.train.update(dict(steps=steps, warmup_steps=min(2, steps - 1), learning_rate=3e-3,
                           log_every=1, checkpoint_every=4), **train)
  return config


def one_device_mesh():
  """A mesh of the first device alone."""
  return sharding.make_mesh(dict(data=1, fsdp=1, tensor=1, expert=1), jax.devices()[:1])


def final_params(workdir, config, step=None):
  """Parameters of a run's checkpoint as NumPy arrays."""
  return jax.tree.map(np.asarray, load_params(workdir, config, one_device_mesh(), step)[1])



def command(module, workdir, steps, checkpoint_every, **flags) -> list[str]:
  """The command line of `python -m module` on a tiny config; flags override TINY_FLAGS."""
  args = [f'--config.{k}={v}' for k, v in {**TINY_FLAGS, 'train.steps': steps,
                                           'train.checkpoint_every': checkpoint_every,
                                           **flags}.items()]
  return [sys.executable, '-m', module, '--config=configs/lm.py', f'--workdir={workdir}', *args]


def env(devices=1) -> dict:
  """The environment of a test's subprocess on `devices` CPU devices, the tests' XLA_FLAGS
  kept."""
  return dict(os.environ, PYTHONUNBUFFERED='1', **launch.cpu_devices_env(devices))


def run(args, devices=1, timeout=300, path=()) -> subprocess.CompletedProcess:
  """Runs a command line from the repository root, bounded in time, with `path` on its
  PYTHONPATH beside the repository."""
  return subprocess.run(args, cwd=REPO, capture_output=True, text=True, timeout=timeout,
                        env=dict(env(devices), PYTHONPATH=os.pathsep.join(map(str, [REPO, *path]))))


def train_cli(workdir, steps=6, checkpoint_every=2, devices=1, **flags) -> str:
  """Trains with experiments.train, which must succeed; returns its output."""
  result = run(command('experiments.train', workdir, steps, checkpoint_every, **flags), devices)
  assert result.returncode == 0, result.stderr[-3000:]
  return result.stdout + result.stderr


def random_workdir(workdir, config, seed: int = 0, std: float = 0.2) -> None:
  """A workdir holding random parameters of config.model (a step-0 parameters checkpoint, as
  import_hf writes) and config.json."""
  checkpointer = checkpoint_lib.Checkpointer(workdir)
  checkpointer.save_params(0, random_params(config.model, seed, std), {}, config)
  checkpointer.wait()
  checkpointer.close()
  checkpoint_lib.save_config(workdir, config)


def run_params(workdir, step=None):
  """Parameters of a checkpoint of a command-line run, read with its config.json."""
  return final_params(workdir, checkpoint_lib.load_config(workdir), step)


def assert_same_params(a, b):
  jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=1e-6, atol=1e-7), a, b)


def random_params(model_cfg, seed: int = 0, std: float = 0.2) -> dict:
  """Parameters drawn in NumPy (no compilation): every weight normal(0, std), every norm scale
  normal around its identity (1 for w, 0 for 1 + w), so no layout or offset error hides."""
  rng = np.random.default_rng(seed)
  abstract = nnx.to_pure_dict(state_lib.abstract_model(model_cfg)[1])
  identity = 0.0 if model_cfg.norm_plus_one else 1.0

  def draw(path, leaf):
    mean = identity if path[-1].key == 'scale' else 0.0
    return jnp.asarray(rng.normal(mean, std, leaf.shape), leaf.dtype)

  return jax.tree_util.tree_map_with_path(draw, abstract)


def busy_threads_at_most() -> int:
  """How many threads can run XLA:CPU's ops at once here: its intra-op pool (one per core this
  process may use) and the calling thread. Traced op time per step cannot exceed this many steps."""
  return len(os.sched_getaffinity(0)) + 1
