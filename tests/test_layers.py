"""Layers against NumPy references and invariants."""

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from gated_attention import layers
from tests import reference


def test_rms_norm_matches_reference():
  x = np.random.default_rng(0).normal(size=(3, 5, 16)).astype(np.float32) * 7
  np.testing.assert_allclose(np.asarray(layers.rms_norm(jnp.asarray(x), 1e-6)),
                             reference.rms_norm(x), rtol=1e-5)


@pytest.mark.parametrize('rotary_dim', [8, 4])
def test_partial_rope_matches_reference(rotary_dim):
  x = np.random.default_rng(1).normal(size=(1, 6, 2, 8)).astype(np.float32)
  sin, cos = layers.rope_tables(jnp.arange(6)[None], rotary_dim, 10_000.0)
  out = np.asarray(layers.apply_rope(jnp.asarray(x), sin, cos))
  np.testing.assert_allclose(out[0], reference.rope(x[0], range(6), rotary_dim, 10_000.0),
                             rtol=1e-5, atol=1e-6)
  np.testing.assert_array_equal(out[..., rotary_dim:], x[..., rotary_dim:])


def test_swiglu_matches_reference():
  mlp = layers.SwiGLU(8, 16, std=0.5, out_std=0.5, param_dtype=jnp.float32, rngs=nnx.Rngs(0))
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
