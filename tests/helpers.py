"""Small configs and model builders shared by the tests."""

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from gated_attention import config as config_lib
from gated_attention import sharding
from gated_attention import state as state_lib
from gated_attention.evaluate import load_params
from gated_attention.model import Attention, Transformer


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


def random_tokens(seed: int, batch: int = 2, length: int = 12, vocab: int = 259):
  return jnp.asarray(np.random.default_rng(seed).integers(0, vocab, (batch, length)), jnp.int32)


def run_config(steps: int = 8, gate: str = 'g1_elementwise', **train):
  """A full experiment config small enough to train in seconds on the embedded corpus."""
  config = config_lib.base_config('tiny', gate)
  config.model.update(dict(d_model=32, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=8,
                           mlp_dim=64))
  config.data.update(seq_len=32, batch_size=8)
  config.eval.update(batches=2, batch_size=8, analysis_batches=1)
  config.train.update(dict(steps=steps, warmup_steps=2, learning_rate=3e-3, log_every=1,
                           checkpoint_every=4), **train)
  return config


def final_params(workdir, config, step=None):
  """Parameters of a run's checkpoint as NumPy arrays."""
  mesh = sharding.make_mesh(dict(data=-1, fsdp=1, tensor=1), jax.devices()[:1])
  return jax.tree.map(np.asarray, load_params(workdir, config, mesh, step)[1])



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
