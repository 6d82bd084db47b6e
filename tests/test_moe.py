"""Mixture of experts against a NumPy reference of routing and combination, and its losses."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from gated_attention.metrics import read_metrics
from gated_attention.model import apply
from gated_attention import moe
from gated_attention.moe import MoE, capacity_slots, expert_capacity, load_balance_loss, route
from gated_attention.train import train
from tests import helpers, reference


def moe_config(num_experts=4, top_k=2, capacity_factor=0.0, **overrides):
  cfg = helpers.model_config('none', **overrides)
  cfg.moe.update(num_experts=num_experts, top_k=top_k, expert_mlp_dim=16,
                 capacity_factor=capacity_factor)
  return cfg


def reference_moe(x, router, wi, wo, top_k, capacity, normalize=True):
  """x [seq, embed] of one sequence; routing and combination written out token by token."""
  logits = x @ router
  probs = np.exp(logits - logits.max(-1, keepdims=True))
  probs /= probs.sum(-1, keepdims=True)
  choices = np.argsort(-probs, axis=-1, kind='stable')[:, :top_k]
  weights = np.take_along_axis(probs, choices, axis=-1)
  if normalize:
    weights /= weights.sum(-1, keepdims=True)
  filled = np.zeros(router.shape[1], int)
  out = np.zeros_like(x)
  for k in range(top_k):  # First choices of every token first, then second choices, ...
    for t in range(x.shape[0]):
      e = choices[t, k]
      if filled[e] < capacity:
        filled[e] += 1
        gate, up = x[t] @ wi[e, :, 0], x[t] @ wi[e, :, 1]
        out[t] += weights[t, k] * ((gate * reference.sigmoid(gate) * up) @ wo[e])
  return out


@pytest.mark.parametrize('top_k, capacity_factor', [(2, 0.0), (1, 0.0), (2, 1.0), (3, 0.5)])
def test_moe_matches_numpy_reference(top_k, capacity_factor):
  cfg = moe_config(num_experts=4, top_k=top_k, capacity_factor=capacity_factor)
  layer = MoE(cfg, std=0.5, out_std=0.5, param_dtype=jnp.float32, rngs=nnx.Rngs(0))
  x = np.random.default_rng(1).normal(size=(3, 10, cfg.d_model)).astype(np.float32)
  capacity = expert_capacity(10, top_k, 4, capacity_factor)
  out, _ = layer(jnp.asarray(x))
  router, wi, wo = (np.asarray(p[...], np.float64) for p in (layer.router, layer.wi, layer.wo))
  for b in range(3):
    np.testing.assert_allclose(np.asarray(out[b]),
                               reference_moe(x[b].astype(np.float64), router, wi, wo, top_k,
                                             capacity), rtol=2e-5, atol=2e-5)


def test_every_token_reaches_exactly_top_k_experts_when_dropless():
  logits = jax.random.normal(jax.random.key(0), (2, 64, 8))
  expert, weight, _ = route(logits, 3, True)
  slot = capacity_slots(expert, 8)
  assert np.all(np.sum(np.asarray(weight) > 0, axis=1) == 3)
  np.testing.assert_allclose(np.asarray(weight).sum(axis=1), 1.0, rtol=1e-6)
  for b in range(2):  # Distinct experts per token, distinct slots per expert.
    assert all(len(set(expert[b, :, t].tolist())) == 3 for t in range(64))
    pairs = list(zip(expert[b].ravel().tolist(), slot[b].ravel().tolist()))
    assert len(set(pairs)) == len(pairs)


def test_capacity_drops_only_assignments_past_it():
  logits = jnp.zeros((1, 8, 4)).at[:, :, 0].set(5.0)  # Every token's first choice: expert 0.
  capacity = expert_capacity(8, 1, 4, 1.0)
  assert capacity == 2
  expert, _, _ = route(logits, 1, True)
  kept = np.asarray(capacity_slots(expert, 4)[0, 0]) < capacity
  np.testing.assert_array_equal(kept, [True, True] + [False] * 6)  # First come, first served.


def test_load_balance_loss_at_a_uniform_router_is_its_minimum_one():
  cfg = moe_config()
  graphdef, params = nnx.split(helpers.transformer(cfg))
  params = nnx.to_pure_dict(params)
  for block in params['blocks'].values():
    block['mlp']['router'] = jnp.zeros_like(block['mlp']['router'])
  aux = apply(graphdef, params, helpers.random_tokens(0)).aux_losses
  np.testing.assert_allclose(aux['load_balance_loss'], 1.0, rtol=1e-6)
  np.testing.assert_allclose(aux['router_z_loss'], math.log(cfg.moe.num_experts) ** 2, rtol=1e-5)


def test_load_balance_loss_of_collapsed_and_balanced_routing():
  experts, seq = 4, 8
  collapsed = jnp.zeros((2, seq, experts)).at[..., 0].set(1.0)
  assert float(load_balance_loss(collapsed, jnp.zeros((2, 1, seq), jnp.int32))) == experts
  # Probabilities uniform over two experts, tokens split evenly between them: 4 * 2 * 1/4 = 2.
  halves = jnp.zeros((1, seq, experts)).at[..., :2].set(0.5)
  split = jnp.tile(jnp.array([0, 1]), seq // 2).reshape(1, 1, seq)
  np.testing.assert_allclose(load_balance_loss(halves, split), 2.0)


def test_auxiliary_losses_average_over_the_counted_tokens_only():
  rng = np.random.default_rng(5)
  batch, seq, experts, top_k = 2, 6, 4, 2
  logits = rng.normal(size=(batch, seq, experts)).astype(np.float32)
  expert = rng.integers(0, experts, (batch, top_k, seq))
  counted = rng.random((batch, seq)) < 0.6
  probs = np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)
  rows = [(b, t) for b in range(batch) for t in range(seq) if counted[b, t]]
  fraction = np.zeros(experts)
  for b, t in rows:
    for k in range(top_k):
      fraction[expert[b, k, t]] += 1 / (top_k * len(rows))
  mean_probs = np.mean([probs[b, t] for b, t in rows], axis=0)
  z = np.mean([np.log(np.exp(logits[b, t]).sum()) ** 2 for b, t in rows])
  np.testing.assert_allclose(
      moe.load_balance_loss(jnp.asarray(probs), jnp.asarray(expert), jnp.asarray(counted)),
      experts * np.sum(fraction * mean_probs), rtol=1e-6)
  np.testing.assert_allclose(moe.router_z_loss(jnp.asarray(logits), jnp.asarray(counted)), z,
                             rtol=1e-6)


def test_trailing_pad_tokens_leave_the_auxiliary_losses_unchanged():
  """Causal: PAD after a sequence changes no earlier position, so with PAD left out the losses
  of the padded batch are those of the sequence alone; counting PAD would move them."""
  graphdef, params = nnx.split(helpers.transformer(moe_config()))
  tokens = helpers.random_tokens(6, length=10, vocab=256)  # Byte ids; PAD is 256.
  padded = jnp.concatenate([tokens, jnp.full((2, 6), 256, jnp.int32)], axis=1)
  alone = apply(graphdef, params, tokens, pad_id=256).aux_losses
  for name, value in apply(graphdef, params, padded, pad_id=256).aux_losses.items():
    np.testing.assert_allclose(value, alone[name], rtol=1e-5)
  counting_pad = apply(graphdef, params, padded).aux_losses
  assert not np.isclose(counting_pad['router_z_loss'], alone['router_z_loss'], rtol=1e-3)


def test_a_small_moe_model_trains_and_reports_its_losses(tmp_path):
  config = helpers.run_config(steps=20, log_every=5, learning_rate=1e-2)
  config.model.moe.update(num_experts=4, top_k=2, expert_mlp_dim=32, capacity_factor=1.25)
  train(config, tmp_path)
  records = read_metrics(tmp_path)
  assert records[-1]['loss'] < records[0]['loss'] - 0.5
  assert all(r['load_balance_loss'] >= 0.99 and r['router_z_loss'] > 0 for r in records)


def _moe_output_and_grads(cfg, x, params=None):
  graphdef, initial = nnx.split(MoE(cfg, std=0.2, out_std=0.2, param_dtype=jnp.float32,
                                    rngs=nnx.Rngs(0)))
  params = nnx.to_pure_dict(initial) if params is None else params

  def loss(p, x):
    out, aux = nnx.merge(graphdef, p)(x)
    weights = jnp.cos(jnp.arange(out.size).reshape(out.shape))  # Weighs every output.
    return jnp.sum(out * weights) + aux['load_balance_loss'], out
  (_, out), grads = jax.value_and_grad(loss, argnums=(0, 1), has_aux=True)(params, x)
  return out, grads


@pytest.mark.parametrize('top_k', [1, 2, 3])
def test_ragged_grouped_matmuls_equal_the_dropless_capacity_path(top_k):
  x = jnp.asarray(np.random.default_rng(2).normal(size=(3, 10, 32)).astype(np.float32))
  results = {}
  for impl in ('capacity', 'ragged'):
    cfg = moe_config(num_experts=4, top_k=top_k, capacity_factor=0.0)
    cfg.moe.impl = impl
    results[impl] = _moe_output_and_grads(cfg, x)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6),
               results['ragged'], results['capacity'])


@pytest.mark.parametrize('pallas', [False, True])
def test_grouped_matmul_multiplies_each_row_by_its_group_and_so_do_its_gradients(pallas):
  """ragged_dot and the megablox kernels (Pallas interpret mode here): against per-group NumPy
  products, with an empty group and a row count that is no multiple of the kernel's tiles."""
  rng = np.random.default_rng(5)
  sizes = np.array([7, 0, 20, 3], np.int32)
  lhs = rng.normal(size=(sizes.sum(), 24)).astype(np.float32)
  rhs = rng.normal(size=(4, 24, 40)).astype(np.float32)
  d_out = rng.normal(size=(sizes.sum(), 40)).astype(np.float32)
  group = np.repeat(np.arange(4), sizes)
  expected = np.einsum('mk,mkn->mn', lhs, rhs[group])
  expected_d_lhs = np.einsum('mn,mkn->mk', d_out, rhs[group])
  expected_d_rhs = np.stack([lhs[group == g].T @ d_out[group == g] for g in range(4)])
  out, vjp = jax.vjp(lambda a, b: moe.grouped_matmul(a, b, jnp.asarray(sizes), pallas),
                     jnp.asarray(lhs), jnp.asarray(rhs))
  d_lhs, d_rhs = vjp(jnp.asarray(d_out))
  for got, want in ((out, expected), (d_lhs, expected_d_lhs), (d_rhs, expected_d_rhs)):
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-4)


def test_shared_expert_adds_its_sigmoid_gated_swiglu():
  cfg = moe_config(num_experts=4, top_k=2)
  cfg.moe.shared_expert_dim = 24
  layer = MoE(cfg, std=0.5, out_std=0.5, param_dtype=jnp.float32, rngs=nnx.Rngs(0))
  x = np.random.default_rng(3).normal(size=(2, 6, cfg.d_model)).astype(np.float32)
  out, _ = layer(jnp.asarray(x))
  router, wi, wo = (np.asarray(p[...], np.float64) for p in (layer.router, layer.wi, layer.wo))
  shared_wi = np.asarray(layer.shared_expert.wi[...], np.float64)
  shared_wo = np.asarray(layer.shared_expert.wo[...], np.float64)
  shared_gate = np.asarray(layer.shared_expert_gate[...], np.float64)
  for b in range(2):
    xb = x[b].astype(np.float64)
    gate, up = xb @ shared_wi[:, 0], xb @ shared_wi[:, 1]
    shared = reference.sigmoid(xb @ shared_gate) * ((gate * reference.sigmoid(gate) * up)
                                                     @ shared_wo)
    expected = reference_moe(xb, router, wi, wo, top_k=2, capacity=6) + shared
    np.testing.assert_allclose(np.asarray(out[b]), expected, rtol=2e-5, atol=2e-5)


@pytest.mark.parametrize('impl', ['capacity', 'ragged'])
def test_save_dots_keeps_the_expert_matmul_outputs_and_full_keeps_none(impl, capsys):
  """model.remat=save_dots keeps every weight matmul's output, the experts' too (their expert
  axis is a batch dimension the dot policy passes over, or they are grouped matmuls)."""
  for remat, kept in (('save_dots', 2), ('full', 0)):
    cfg = moe_config(remat=remat, num_layers=1)
    cfg.moe.impl = impl
    graphdef, state = nnx.split(helpers.transformer(cfg))
    loss = lambda params: jnp.mean(nnx.merge(graphdef, params)(
        helpers.random_tokens(6)).logits ** 2)
    jax.ad_checkpoint.print_saved_residuals(loss, nnx.to_pure_dict(state))
    assert capsys.readouterr().out.count(f"named '{moe.EXPERT_MATMUL}'") == kept, remat
