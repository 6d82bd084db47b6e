"""Invariants of the full model: causality, implementation equivalence, gradients, dtypes."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from gated_attention.config import GATE_PRESETS
from tests import helpers


@pytest.mark.parametrize('impl', ['xla', 'dot_product'])
@pytest.mark.parametrize('variant', sorted(GATE_PRESETS))
def test_causality(variant, impl):
  """Changing tokens after position t never changes logits at positions <= t."""
  model = helpers.transformer(helpers.model_config(variant, attention_impl=impl))
  tokens = helpers.random_tokens(0)
  changed = tokens.at[:, 6:].set(helpers.random_tokens(1)[:, 6:])
  before, after = model(tokens), model(changed)
  np.testing.assert_allclose(np.asarray(before[:, :6]), np.asarray(after[:, :6]), atol=1e-6)
  assert not np.allclose(np.asarray(before[:, 6:]), np.asarray(after[:, 6:]))


@pytest.mark.parametrize('variant', ['none', 'g1_elementwise', 'g2_headwise', 'g5'])
def test_xla_and_dot_product_models_agree(variant):
  xla = helpers.transformer(helpers.model_config(variant, attention_impl='xla'))
  dot = helpers.transformer(helpers.model_config(variant, attention_impl='dot_product'))
  tokens = helpers.random_tokens(2)
  np.testing.assert_allclose(np.asarray(xla(tokens)), np.asarray(dot(tokens)), atol=2e-5)


def test_identity_gate_equals_plain_model_with_same_weights():
  """G1 additive with zero gate weights and identity activation adds 0: the plain model."""
  plain = helpers.transformer(helpers.model_config('none'))
  gated_cfg = helpers.model_config('g1_elementwise', gate_overrides=dict(
      mode='additive', activation='identity'))
  graphdef, _ = nnx.split(helpers.transformer(gated_cfg))
  params = nnx.to_pure_dict(nnx.state(plain))
  for block in params['blocks'].values():
    wq = block['attention']['wq']
    block['attention']['wq'] = jnp.concatenate([wq, jnp.zeros_like(wq)], axis=-1)
  tokens = helpers.random_tokens(3)
  np.testing.assert_allclose(np.asarray(nnx.merge(graphdef, params)(tokens)),
                             np.asarray(plain(tokens)), atol=1e-6)


@pytest.mark.parametrize('variant', ['g1_elementwise', 'g1_headwise', 'g2_elementwise', 'g5',
                                     'g1_input_independent'])
def test_gradients_reach_the_gate(variant):
  cfg = helpers.model_config(variant)
  graphdef, params = nnx.split(helpers.transformer(cfg))
  params = nnx.to_pure_dict(params)
  tokens = helpers.random_tokens(4)

  def loss(p):
    logits = nnx.merge(graphdef, p)(tokens[:, :-1])
    return -jnp.mean(jax.nn.log_softmax(logits)[..., 0])

  grads = jax.grad(loss)(params)['blocks'][0]['attention']
  if variant == 'g5':
    gate_grad = grads['gate']['kernel']
  elif variant == 'g1_input_independent':
    gate_grad = grads['gate']['score']
  else:
    name = 'wv' if variant.startswith('g2') else 'wq'
    gate_grad = grads[name][..., cfg.head_dim:]  # The fused gate columns.
  assert np.all(np.isfinite(gate_grad)) and np.abs(gate_grad).max() > 1e-6


def test_bfloat16_compute_with_float32_params_stays_close():
  f32 = helpers.transformer(helpers.model_config('g1_elementwise', init_std=0.05))
  bf16 = helpers.transformer(helpers.model_config('g1_elementwise', init_std=0.05,
                                                  dtype='bfloat16'))
  assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(nnx.state(bf16)))
  tokens = helpers.random_tokens(5)
  low, high = bf16(tokens), f32(tokens)
  assert low.dtype == jnp.float32  # Logits are accumulated in float32.
  np.testing.assert_allclose(np.asarray(low), np.asarray(high), atol=0.05)
  p_low, p_high = jax.nn.softmax(low), jax.nn.softmax(high)
  assert float(jnp.abs(p_low - p_high).max()) < 0.01


def test_untied_embeddings_add_an_output_head():
  tied = helpers.model_config('none')
  untied = helpers.model_config('none', tie_embeddings=False)
  count = lambda c: sum(x.size for x in jax.tree.leaves(nnx.state(helpers.transformer(c))))
  assert count(untied) - count(tied) == tied.d_model * tied.vocab_size


def test_sandwich_norm_adds_one_norm_per_layer():
  plain = helpers.model_config('none')
  sandwich = helpers.model_config('none', sandwich_norm=True)
  count = lambda c: sum(x.size for x in jax.tree.leaves(nnx.state(helpers.transformer(c))))
  assert count(sandwich) - count(plain) == plain.num_layers * plain.d_model


def test_remat_gives_the_same_gradients():
  tokens = helpers.random_tokens(6)
  grads = {}
  for remat in (False, True):
    graphdef, params = nnx.split(helpers.transformer(helpers.model_config('g1_elementwise',
                                                                          remat=remat)))
    loss = lambda p: jnp.mean(nnx.merge(graphdef, p)(tokens) ** 2)
    grads[remat] = jax.grad(loss)(nnx.to_pure_dict(params))
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7),
               grads[False], grads[True])
