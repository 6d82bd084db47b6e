"""Invariants of the full model: causality, implementation equivalence, gradients, dtypes."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from gated_attention import config as config_lib
from gated_attention import state as state_lib
from gated_attention.config import GATE_PRESETS
from gated_attention.model import KVCache, mlp_width
from gated_attention.optimizer import make_optimizer
from tests import helpers


@pytest.mark.parametrize('impl', ['xla', 'dot_product'])
@pytest.mark.parametrize('variant', sorted(GATE_PRESETS))
def test_causality(variant, impl):
  """Changing tokens after position t never changes logits at positions <= t."""
  model = helpers.transformer(helpers.model_config(variant, attention_impl=impl))
  tokens = helpers.random_tokens(0)
  changed = tokens.at[:, 6:].set(helpers.random_tokens(1)[:, 6:])
  before, after = model(tokens).logits, model(changed).logits
  np.testing.assert_allclose(np.asarray(before[:, :6]), np.asarray(after[:, :6]), atol=1e-6)
  assert not np.allclose(np.asarray(before[:, 6:]), np.asarray(after[:, 6:]))


@pytest.mark.parametrize('variant', ['none', 'g1_elementwise', 'g2_headwise', 'g5'])
def test_xla_and_dot_product_models_agree(variant):
  xla = helpers.transformer(helpers.model_config(variant, attention_impl='xla'))
  dot = helpers.transformer(helpers.model_config(variant, attention_impl='dot_product'))
  tokens = helpers.random_tokens(2)
  np.testing.assert_allclose(np.asarray(xla(tokens).logits), np.asarray(dot(tokens).logits),
                             atol=2e-5)


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
  np.testing.assert_allclose(np.asarray(nnx.merge(graphdef, params)(tokens).logits),
                             np.asarray(plain(tokens).logits), atol=1e-6)


@pytest.mark.parametrize('variant', ['g1_elementwise', 'g1_headwise', 'g2_elementwise', 'g5',
                                     'g1_input_independent'])
def test_gradients_reach_the_gate(variant):
  cfg = helpers.model_config(variant)
  graphdef, params = nnx.split(helpers.transformer(cfg))
  params = nnx.to_pure_dict(params)
  tokens = helpers.random_tokens(4)

  def loss(p):
    logits = nnx.merge(graphdef, p)(tokens[:, :-1]).logits
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
  low, high = bf16(tokens).logits, f32(tokens).logits
  assert low.dtype == jnp.float32  # Logits are accumulated in float32.
  np.testing.assert_allclose(np.asarray(low), np.asarray(high), atol=0.05)
  p_low, p_high = jax.nn.softmax(low), jax.nn.softmax(high)
  assert float(jnp.abs(p_low - p_high).max()) < 0.01


def test_untied_embeddings_add_an_output_head():
  tied = helpers.model_config('none')
  untied = helpers.model_config('none', tie_embeddings=False)
  count = lambda c: sum(x.size for x in jax.tree.leaves(nnx.state(helpers.transformer(c))))
  assert count(untied) - count(tied) == tied.d_model * tied.vocab_size


@pytest.mark.parametrize('tie', [True, False])
def test_the_loss_given_targets_is_the_cross_entropy_of_the_logits(tie):
  """Targets in: summed cross-entropy out, whole or 4 positions at a time, with the gradients of
  the cross-entropy written from the logits (log_softmax), PAD targets not counted."""
  tokens = helpers.random_tokens(7, length=17)
  inputs, targets = tokens[:, :-1], tokens[:, 1:].at[0, :4].set(0)

  def plain(p):
    log_probs = jax.nn.log_softmax(nnx.merge(graphdef, p)(inputs).logits)
    picked = jnp.take_along_axis(log_probs, targets[..., None], axis=-1)[..., 0]
    return -jnp.sum(jnp.where(targets != 0, picked, 0.0))

  for chunk in (0, 4):
    cfg = helpers.model_config('g1_elementwise', tie_embeddings=tie, loss_chunk=chunk)
    graphdef, params = nnx.split(helpers.transformer(cfg))
    params = nnx.to_pure_dict(params)
    output = nnx.merge(graphdef, params)(inputs, targets=targets, pad_id=0)
    assert output.logits is None and int(output.num_tokens) == targets.size - 4
    expected, expected_grads = jax.jit(jax.value_and_grad(plain))(params)
    loss, grads = jax.jit(jax.value_and_grad(lambda p: nnx.merge(graphdef, p)(
        inputs, targets=targets, pad_id=0).loss_sum))(params)
    np.testing.assert_allclose(loss, expected, rtol=1e-5)
    jax.tree.map(lambda g, e: np.testing.assert_allclose(g, e, rtol=1e-4, atol=1e-5), grads,
                 expected_grads)


def test_sandwich_norm_adds_one_norm_per_layer():
  plain = helpers.model_config('none')
  sandwich = helpers.model_config('none', sandwich_norm=True)
  count = lambda c: sum(x.size for x in jax.tree.leaves(nnx.state(helpers.transformer(c))))
  assert count(sandwich) - count(plain) == plain.num_layers * plain.d_model


def _loss_and_grads(model_cfg, params=None, tokens=None):
  graphdef, initial = nnx.split(helpers.transformer(model_cfg))
  params = nnx.to_pure_dict(initial) if params is None else params
  tokens = helpers.random_tokens(6) if tokens is None else tokens
  loss = lambda p: jnp.mean(nnx.merge(graphdef, p)(tokens).logits ** 2)
  return jax.value_and_grad(loss)(params)


@pytest.mark.parametrize('impl', ['xla', 'chunked'])
def test_remat_policies_and_scanned_layers_give_the_same_loss_and_gradients(impl):
  """Every (remat, scan_layers) pair: the same function of the same weights (the unrolled
  model's, converted to the scanned layout where needed), with attention computed whole or by
  a kernel whose output save_dots keeps."""
  unrolled = nnx.to_pure_dict(nnx.state(helpers.transformer(helpers.model_config(
      'g1_elementwise'))))
  expected_loss, expected_grads = _loss_and_grads(helpers.model_config('g1_elementwise'))
  for remat in ('full', 'save_dots', 'none'):
    for scan in (False, True):
      cfg = helpers.model_config('g1_elementwise', remat=remat, scan_layers=scan,
                                 attention_impl=impl)
      loss, grads = _loss_and_grads(cfg, state_lib.convert_layers(unrolled, scan))
      np.testing.assert_allclose(loss, expected_loss, rtol=1e-6)
      jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7),
                   state_lib.convert_layers(grads, False), expected_grads)


@pytest.mark.parametrize('impl, kernel', [('chunked', 'while['), ('splash', 'pallas_call['),
                                           ('cpu_flash', 'ffi_call[')])
def test_save_dots_keeps_the_attention_kernels_output_so_its_forward_runs_once(impl, kernel):
  """The gradient under remat=save_dots runs each attention kernel as often as without remat
  (its output and log-sum-exp are kept); under `full` the forward kernel runs once more."""
  runs = {}
  for remat in ('none', 'save_dots', 'full'):
    cfg = helpers.model_config('g1_elementwise', remat=remat, attention_impl=impl, num_layers=1)
    graphdef, state = nnx.split(helpers.transformer(cfg))
    loss = lambda params: jnp.mean(nnx.merge(graphdef, params)(
        helpers.random_tokens(6, length=128)).logits ** 2)  # Splash's blocks are 128 long.
    runs[remat] = str(jax.make_jaxpr(jax.grad(loss))(nnx.to_pure_dict(state))).count(kernel)
  assert runs['none'] >= 2 and runs == {'none': runs['none'], 'save_dots': runs['none'],
                                        'full': runs['none'] + 1}


@pytest.mark.parametrize('variant, overrides', [
    ('none', {}), ('g1_elementwise', {}), ('g1_headwise', dict(scan_layers=True)),
    ('g2_elementwise', {}), ('g3_elementwise', {}), ('g4_elementwise', {}), ('g5', {}),
    ('g1_input_independent', {}),
    ('g1_elementwise', dict(moe=dict(num_experts=4, top_k=2, expert_mlp_dim=16,
                                     shared_expert_dim=8)))])
def test_fused_projections_give_the_same_loss_and_gradients(variant, overrides):
  """One product for query, key, value and the gate's W_theta (grouped by KV head: 4 query
  heads over 2 here), and one for the SwiGLU's halves: the separate products' function."""
  separate = helpers.model_config(variant, **overrides)
  params = nnx.to_pure_dict(nnx.state(helpers.transformer(separate)))
  expected_loss, expected_grads = _loss_and_grads(separate, params)
  loss, grads = _loss_and_grads(helpers.model_config(variant, fused_projections=True,
                                                     **overrides), params)
  np.testing.assert_allclose(loss, expected_loss, rtol=1e-6)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7), grads,
               expected_grads)


def test_layer_layouts_convert_both_ways_with_the_optimizer_state():
  cfg = helpers.model_config('g2_headwise', num_layers=3)
  params = nnx.to_pure_dict(nnx.state(helpers.transformer(cfg)))
  train_state = state_lib.init_train_state(params, make_optimizer(config_lib.base_config().train))
  scanned = state_lib.convert_layers(train_state, True)
  assert 'blocks' not in scanned['params'] and scanned['params']['layers']['attention'][
      'wq'].shape == (3, *params['blocks'][0]['attention']['wq'].shape)
  scanned_model = helpers.transformer(helpers.model_config('g2_headwise', num_layers=3,
                                                           scan_layers=True))
  fresh = state_lib.init_train_state(nnx.to_pure_dict(nnx.state(scanned_model)),
                                     make_optimizer(config_lib.base_config().train))
  assert jax.tree.structure(scanned) == jax.tree.structure(fresh)
  jax.tree.map(np.testing.assert_array_equal, state_lib.convert_layers(scanned, False),
               train_state)


def test_analysis_reports_every_layer_the_same_under_either_layout():
  """The scanned model (the unrolled one's weights, stacked) measures what the unrolled one
  measures, layer by layer."""
  cfg = helpers.model_config('g1_elementwise', num_layers=3)
  graphdef, state = nnx.split(helpers.transformer(cfg))
  unrolled = nnx.to_pure_dict(state)
  scanned_graphdef, _ = nnx.split(helpers.transformer(helpers.model_config(
      'g1_elementwise', num_layers=3, scan_layers=True)))
  tokens = helpers.random_tokens(7)
  stats = [nnx.merge(graphdef, unrolled)(tokens, analysis=True).stats,
           nnx.merge(scanned_graphdef, state_lib.convert_layers(unrolled, True))(
               tokens, analysis=True).stats]
  for layout in stats:
    assert layout['first_token_attention'].shape == (3, 2, cfg.num_heads, 12)
    assert layout['attention_map'].shape == (3, cfg.num_heads, 12, 12)
    assert layout['value_norm'].shape == (3, 2, 12, cfg.num_kv_heads)
    assert layout['max_activation'].shape == (3,) and layout['gate_score_sum'].shape == (3,)
    np.testing.assert_allclose(np.asarray(layout['attention_map']).sum(-1), 1.0, rtol=1e-5)
  assert set(stats[0]) == set(stats[1])
  for name in stats[0]:
    np.testing.assert_allclose(np.asarray(stats[1][name]), np.asarray(stats[0][name]),
                               rtol=1e-5, atol=1e-6, err_msg=name)


@pytest.mark.parametrize('variant, scan', [('g1_elementwise', False), ('g2_headwise', True),
                                           ('g5', False), ('none', True)])
def test_prefill_then_decode_with_a_kv_cache_equals_the_full_forward(variant, scan):
  """Logits of a prompt prefilled into a cache, then one token at a time, with two sequences at
  different lengths, equal the logits of running each whole sequence at once."""
  cfg = helpers.model_config(variant, scan_layers=scan, attention_impl='chunked')
  model = helpers.transformer(cfg)
  tokens = helpers.random_tokens(8, length=10)
  full = model(tokens).logits
  cache = KVCache.empty(cfg, batch=2, max_length=16, dtype=jnp.float32)
  out = model(tokens[:, :4], cache=cache)  # Both prompts 4 long...
  np.testing.assert_allclose(np.asarray(out.logits), np.asarray(full[:, :4]), atol=2e-5)
  cache = out.cache._replace(length=jnp.array([4, 3]))  # ...then sequence 1 steps back one.
  for step in range(5):
    positions = cache.length
    next_tokens = jnp.take_along_axis(tokens, positions[:, None], axis=1)
    out = model(next_tokens, cache=cache)
    expected = jnp.take_along_axis(full, positions[:, None, None], axis=1)
    np.testing.assert_allclose(np.asarray(out.logits), np.asarray(expected), atol=2e-5,
                               err_msg=f'step {step}')
    cache = out.cache
  np.testing.assert_array_equal(np.asarray(cache.length), [9, 8])


@pytest.mark.parametrize('gate, overrides', [
    ('g1_elementwise', {}), ('g5', dict(scan_layers=True)),
    ('g1_headwise', dict(moe=dict(num_experts=4, top_k=2, expert_mlp_dim=16, shared_expert_dim=8)))])
@pytest.mark.parametrize('param_dtype', ['bfloat16', 'float16'])
def test_every_parameter_is_created_in_param_dtype(gate, overrides, param_dtype):
  """The output projections' smaller init std (a NumPy float) once promoted them to float32."""
  model_config = helpers.model_config(gate, param_dtype=param_dtype, **overrides)
  _, abstract = state_lib.abstract_model(model_config)
  dtypes = {str(leaf.dtype) for leaf in jax.tree.leaves(nnx.to_pure_dict(abstract))}
  assert dtypes == {param_dtype}


def test_match_baseline_params_narrows_a_gated_mlp_to_a_multiple_of_16_and_no_other():
  ungated = helpers.model_config('none', match_baseline_params=True, mlp_dim=100)
  assert mlp_width(ungated) == 100  # Nothing to pay for.
  # The gate's 32 x 4 x 8 = 1,024 parameters a layer are 10.7 units of 3 x 32: 89.3 -> 96.
  gated = helpers.model_config('g1_elementwise', match_baseline_params=True, mlp_dim=100)
  assert mlp_width(gated) == 96
