"""The gate against a NumPy reference written from the paper's formulas, and its parameter
counts against PAPER.md's table."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from gated_attention import config as config_lib
from tests import helpers, reference

# Every named variant, the input-independent gate at G5 (its score [d_model]), and G1 without
# the QK-norm.
REFERENCE_VARIANTS = [*sorted(config_lib.GATE_PRESETS), 'g5+gate.input_dependent=false',
                      'g1_elementwise+qk_norm=false']


def reference_weights(module, cfg):
  """The module's weights under the names the reference uses; fused gate columns split per head."""
  gate = module.gate
  weights = {name: np.asarray(getattr(module, attr)[...])
             for name, attr in (('query', 'wq'), ('key', 'wk'), ('value', 'wv'), ('out', 'wo'))}
  if gate.fused_into:
    fused = weights[gate.fused_into]
    weights[gate.fused_into] = fused[..., :cfg.head_dim]
    weights['gate'] = fused[..., cfg.head_dim:]
    assert weights['gate'].shape[-1] == gate.width
  elif gate.enabled and not gate.input_dependent:
    weights['score'] = np.asarray(gate.score[...])
  elif gate.position == 'dense':
    weights['gate'] = np.asarray(gate.kernel[...])
  if module.q_norm is not None:
    weights['q_norm'] = np.asarray(module.q_norm.scale[...])
    weights['k_norm'] = np.asarray(module.k_norm.scale[...])
  return weights


@pytest.mark.parametrize('variant', REFERENCE_VARIANTS)
def test_attention_block_matches_numpy_reference(variant):
  cfg = helpers.model_config('none')
  config_lib.set_variant(cfg, variant, 'variant')
  module = helpers.attention(cfg, seed=1)
  # Non-trivial norm scales and input-independent scores (initialised to 0), so the reference
  # really checks where they apply.
  if cfg.qk_norm:
    module.q_norm.scale[...] = 1.0 + 0.3 * jax.random.normal(jax.random.key(5), (cfg.head_dim,))
    module.k_norm.scale[...] = 1.0 + 0.3 * jax.random.normal(jax.random.key(6), (cfg.head_dim,))
  if hasattr(module.gate, 'score'):
    module.gate.score[...] = jax.random.normal(jax.random.key(7), module.gate.score.shape)
  x = np.random.default_rng(0).normal(size=(2, 7, cfg.d_model)).astype(np.float32)

  rope = helpers.rope(7, cfg)
  out, _ = module(jnp.asarray(x), rope)

  gate_config = dict(cfg.gate, position=config_lib.canonical_gate_position(cfg.gate.position))
  weights = reference_weights(module, cfg)
  expected = np.stack([reference.attention_block(x[b].astype(np.float64), weights, cfg,
                                                 gate_config) for b in range(2)])
  np.testing.assert_allclose(np.asarray(out), expected, rtol=1e-5, atol=1e-5)


def test_input_independent_gate_starts_at_half_and_ignores_input():
  cfg = helpers.model_config('g1_input_independent')
  module = helpers.attention(cfg)
  assert module.gate.score[...].shape == (cfg.num_heads, cfg.head_dim)
  np.testing.assert_array_equal(np.asarray(module.gate.score[...]), 0.0)
  y = jnp.ones((1, 3, cfg.num_heads, cfg.head_dim))
  gated, _ = module.gate(y, module.gate.logits(jnp.zeros((1, 3, cfg.d_model))))
  np.testing.assert_allclose(np.asarray(gated), 0.5)
  # Learned scores, two different inputs: the same gate.
  module.gate.score[...] = jax.random.normal(jax.random.key(0), module.gate.score.shape)
  inputs = jax.random.normal(jax.random.key(1), (2, 1, 3, cfg.d_model))
  scores = [module.gate(y, module.gate.logits(x))[1] for x in inputs]
  np.testing.assert_array_equal(np.asarray(scores[0]), np.asarray(scores[1]))
  np.testing.assert_allclose(np.asarray(scores[0][0, 0]),
                             reference.sigmoid(np.asarray(module.gate.score[...])), rtol=1e-6)


@pytest.mark.parametrize('kind', ['rms_norm', 'silu'])
def test_sdpa_nonlinearity_variants_are_parameter_free(kind):
  plain = helpers.model_config('none')
  variant = helpers.model_config(f'sdpa_{kind}')
  count = lambda c: sum(x.size for x in jax.tree.leaves(nnx.state(helpers.attention(c))))
  assert count(plain) == count(variant)
  x, = np.random.default_rng(0).normal(size=(1, 2, 5, plain.d_model)).astype(np.float32)
  rope = helpers.rope(5, plain)
  assert not np.allclose(helpers.attention(plain)(x, rope)[0],
                         helpers.attention(variant)(x, rope)[0])


# PAPER.md's 15B-A2.5B MoE attention: 24 layers, d_model 2048, 32 query heads, 4 KV heads,
# head_dim 128. Added gate parameters = layers x d_model x width, in millions.
PAPER_GATE_PARAMS = {
    'g1_elementwise': 24 * 2048 * 4096, 'g2_elementwise': 24 * 2048 * 512,
    'g3_elementwise': 24 * 2048 * 512, 'g4_elementwise': 24 * 2048 * 4096,
    'g5': 24 * 2048 * 2048, 'g1_headwise': 24 * 2048 * 32, 'g2_headwise': 24 * 2048 * 4,
    'g1_head_shared': 24 * 2048 * 4096, 'g2_head_shared': 24 * 2048 * 512,
}
PAPER_GATE_PARAMS_ROUNDED = {'g1_elementwise': 201e6, 'g2_elementwise': 25e6, 'g5': 100e6,
                             'g1_headwise': 1.6e6, 'g2_headwise': 0.2e6}


@pytest.mark.parametrize('variant', sorted(PAPER_GATE_PARAMS))
def test_gate_parameter_count_matches_paper_table(variant):
  def attention_params(gate):
    cfg = config_lib.base_config('tiny', gate).model
    cfg.update(dict(d_model=2048, num_heads=32, num_kv_heads=4, head_dim=128))
    abstract = nnx.eval_shape(lambda: helpers.attention(cfg))  # Shapes only: nothing allocated.
    return sum(x.size for x in jax.tree.leaves(nnx.state(abstract)))
  added = 24 * (attention_params(variant) - attention_params('none'))
  assert added == PAPER_GATE_PARAMS[variant]
  if variant in PAPER_GATE_PARAMS_ROUNDED:
    assert abs(added - PAPER_GATE_PARAMS_ROUNDED[variant]) / added < 0.03

