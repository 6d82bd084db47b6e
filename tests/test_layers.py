"""Layers against NumPy references and invariants."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from gated_attention import config as config_lib
from gated_attention import layers
from tests import helpers, reference


def test_rms_norm_matches_reference():
  x = np.random.default_rng(0).normal(size=(3, 5, 16)).astype(np.float32) * 7
  np.testing.assert_allclose(np.asarray(layers.rms_norm(jnp.asarray(x), 1e-6)),
                             reference.rms_norm(x), rtol=1e-5)


def test_rms_norm_of_an_overflowing_row_is_nan_not_zeros():
  x = jnp.asarray([[1e20, 1.0, -2.0, 3.0], [1.0, 2.0, 3.0, 4.0]], jnp.float32)
  for out in (layers.rms_norm(x, 1e-6), layers.scaled_rms_norm(x, jnp.ones(4), 1e-6)):
    assert np.isnan(out[0]).all() and np.isfinite(out[1]).all()


def test_scaled_rms_norm_gradient_equals_autodiff():
  """scaled_rms_norm's closed-form VJP equals autodiff of x / rms(x) * scale, for x and scale."""
  rng = np.random.default_rng(4)
  x = jnp.asarray(rng.normal(size=(2, 5, 3, 16)).astype(np.float32))
  scale = jnp.asarray(rng.normal(size=(16,)).astype(np.float32))
  d_out = jnp.asarray(rng.normal(size=x.shape).astype(np.float32))
  plain = lambda x, scale: layers.rms_norm(x, 1e-6) * scale
  np.testing.assert_allclose(layers.scaled_rms_norm(x, scale, 1e-6), plain(x, scale), rtol=1e-6)
  _, custom = jax.vjp(lambda x, scale: layers.scaled_rms_norm(x, scale, 1e-6), x, scale)
  _, autodiff = jax.vjp(plain, x, scale)
  for got, want in zip(custom(d_out), autodiff(d_out)):
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize('rotary_dim', [8, 4])
def test_partial_rope_matches_reference(rotary_dim):
  x = np.random.default_rng(1).normal(size=(1, 6, 2, 8)).astype(np.float32)
  sin, cos = layers.rope_tables(jnp.arange(6)[None], *layers.rope_frequencies(
      rotary_dim, 10_000.0, config_lib.base_config().model.rope_scaling))
  out = np.asarray(layers.apply_rope(jnp.asarray(x), sin, cos))
  np.testing.assert_allclose(out[0], reference.rope(x[0], range(6), rotary_dim, 10_000.0),
                             rtol=1e-5, atol=1e-6)
  np.testing.assert_array_equal(out[..., rotary_dim:], x[..., rotary_dim:])


@pytest.mark.parametrize('rotary_dim,attention_factor', [(8, 1.0), (4, 1.3)])
def test_rope_gradient_is_the_inverse_rotation(rotary_dim, attention_factor):
  """apply_rope's own VJP (the transposed rotation) equals autodiff of the same formula, with a
  partial rotary and a YaRN-style factor in sin and cos."""
  x = jnp.asarray(np.random.default_rng(2).normal(size=(2, 6, 3, 8)).astype(np.float32))
  d_out = jnp.asarray(np.random.default_rng(3).normal(size=x.shape).astype(np.float32))
  inv_freq, _ = layers.rope_frequencies(rotary_dim, 10_000.0,
                                        config_lib.base_config().model.rope_scaling)
  sin, cos = layers.rope_tables(jnp.arange(6)[None], inv_freq, attention_factor)
  _, custom = jax.vjp(lambda x: layers.apply_rope(x, sin, cos), x)
  rotate = layers._rotate  # pylint: disable=protected-access
  _, autodiff = jax.vjp(lambda x: rotate(x, sin, cos), x)
  np.testing.assert_allclose(custom(d_out)[0], autodiff(d_out)[0], rtol=1e-6, atol=1e-6)


def test_rope_tables_of_known_positions_are_constants_equal_to_the_traced_ones():
  """NumPy positions give NumPy tables (constants in a compiled program); traced positions the
  same values from XLA, and both match the formula in float64. A model's compiled forward pass
  then evaluates no sine at all."""
  inv_freq, factor = layers.rope_frequencies(32, 10_000.0, _scaling(
      type='yarn', factor=4.0, original_max_position=256))
  positions = np.arange(4096)[None]
  constant = layers.rope_tables(positions, inv_freq, factor)
  traced = jax.jit(lambda p: layers.rope_tables(p, inv_freq, factor))(jnp.asarray(positions))
  angles = (positions.astype(np.float32)[..., None] * inv_freq).astype(np.float64)
  for got, want, formula in zip(constant, traced, (np.sin(angles), np.cos(angles))):
    assert isinstance(got, np.ndarray) and got.dtype == np.float32
    np.testing.assert_allclose(got, np.asarray(want), rtol=0, atol=3e-7 * factor)
    np.testing.assert_allclose(got, formula * factor, rtol=0, atol=2e-7 * factor)
  model = helpers.transformer(helpers.model_config())
  graphdef, params = nnx.split(model)
  program = jax.jit(lambda params, tokens: nnx.merge(graphdef, params)(tokens).logits).lower(
      params, helpers.random_tokens(0)).compile().as_text()
  assert ' sine(' not in program and ' cosine(' not in program


@pytest.mark.parametrize('fused', [False, True])
def test_swiglu_matches_reference(fused):
  mlp = layers.SwiGLU(8, 16, std=0.5, out_std=0.5, param_dtype=jnp.float32, fused=fused,
                      rngs=nnx.Rngs(0))
  x = np.random.default_rng(3).normal(size=(1, 4, 8)).astype(np.float32)
  wi, wo = np.asarray(mlp.wi[...]), np.asarray(mlp.wo[...])
  gate, up = x @ wi[:, 0], x @ wi[:, 1]
  expected = (gate * reference.sigmoid(gate) * up) @ wo
  np.testing.assert_allclose(np.asarray(mlp(jnp.asarray(x))), expected, rtol=1e-5, atol=1e-5)


def test_rms_norm_plus_one_starts_as_identity_scale():
  norm = layers.RMSNorm(8, 'embed', eps=1e-6, plus_one=True, param_dtype=jnp.float32,
                        rngs=nnx.Rngs(0))
  x = np.random.default_rng(4).normal(size=(2, 8)).astype(np.float32)
  np.testing.assert_array_equal(np.asarray(norm.scale[...]), 0.0)
  np.testing.assert_allclose(np.asarray(norm(jnp.asarray(x))), reference.rms_norm(x), rtol=1e-5)


def _scaling(**fields):
  scaling = config_lib.base_config().model.rope_scaling
  scaling.update(fields)
  return scaling


@pytest.mark.parametrize('rotary_dim, theta, factor, original', [
    (64, 10_000.0, 4.0, 256), (32, 1e6, 8.0, 4096), (16, 10_000.0, 2.0, 64)])
def test_yarn_matches_a_reference_written_from_its_formulas(rotary_dim, theta, factor,
                                                            original):
  inv_freq, attention_factor = layers.rope_frequencies(rotary_dim, theta, _scaling(
      type='yarn', factor=factor, original_max_position=original))
  expected, expected_factor = reference.yarn(rotary_dim, theta, factor, original)
  np.testing.assert_allclose(inv_freq, expected, rtol=2e-6)
  np.testing.assert_allclose(attention_factor, expected_factor, rtol=1e-12)
  # Fast dimensions keep their frequency, slow ones are interpolated by the factor.
  base = layers.rope_frequencies(rotary_dim, theta, _scaling())[0]
  assert inv_freq[0] == base[0] and inv_freq[-1] == pytest.approx(base[-1] / factor)


def test_linear_scaling_is_position_interpolation():
  """Position p under linear scaling by s is unscaled RoPE at position p / s."""
  scaled = layers.rope_frequencies(16, 10_000.0, _scaling(type='linear', factor=4.0))
  plain = layers.rope_frequencies(16, 10_000.0, _scaling())
  positions = jnp.arange(0, 64, 4)[None]
  for got, want in zip(layers.rope_tables(positions, *scaled),
                       layers.rope_tables(positions // 4, *plain)):
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=1e-5)


@pytest.mark.parametrize('rope_type, extra', [
    ('yarn', dict(original_max_position_embeddings=128, beta_fast=16.0, beta_slow=2.0)),
    ('yarn', dict(original_max_position_embeddings=512, mscale=0.707, mscale_all_dim=1.0)),
    ('linear', {})])
def test_rope_scaling_matches_transformers(rope_type, extra):
  transformers = pytest.importorskip('transformers')
  hf = transformers.Qwen3Config(head_dim=32, hidden_size=64, num_attention_heads=2,
                                rope_parameters=dict(rope_type=rope_type, rope_theta=50_000.0,
                                                     factor=8.0, **extra))
  rotary = transformers.models.qwen3.modeling_qwen3.Qwen3RotaryEmbedding(hf)
  ours = _scaling(type=rope_type, factor=8.0,
                  original_max_position=extra.get('original_max_position_embeddings', 0),
                  beta_fast=extra.get('beta_fast', 32.0), beta_slow=extra.get('beta_slow', 1.0),
                  mscale=extra.get('mscale', 0.0), mscale_all_dim=extra.get('mscale_all_dim', 0.0))
  inv_freq, attention_factor = layers.rope_frequencies(32, 50_000.0, ours)
  np.testing.assert_allclose(inv_freq, rotary.inv_freq.numpy(), rtol=1e-6)
  np.testing.assert_allclose(attention_factor, rotary.attention_scaling, rtol=1e-6)
