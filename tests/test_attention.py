"""Every attention implementation against a NumPy reference and against `xla`, on values and
gradients; the KV-cache offsets; memory linear in length for `chunked`."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gated_attention import attention
from gated_attention.config import ConfigError
from tests import reference


def _qkv(seed, batch=2, length=9, heads=4, kv_heads=2, head_dim=8):
  rng = np.random.default_rng(seed)
  q = rng.normal(size=(batch, length, heads, head_dim)).astype(np.float32)
  k = rng.normal(size=(batch, length, kv_heads, head_dim)).astype(np.float32)
  v = rng.normal(size=(batch, length, kv_heads, head_dim)).astype(np.float32)
  return jnp.asarray(q), jnp.asarray(k), jnp.asarray(v)


def test_xla_attention_matches_reference_and_returns_probs():
  q, k, v = _qkv(0)
  out, probs = attention.softmax_attention(q, k, v)
  expected, expected_probs = reference.causal_softmax_attention(*(np.asarray(x[0]) for x in
                                                                  (q, k, v)))
  np.testing.assert_allclose(np.asarray(out[0]), expected, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(np.asarray(probs[0]), expected_probs, rtol=1e-5, atol=1e-6)


# chunked with 4-long blocks: several query and key blocks, a ragged last block, skipped ones.
IMPLEMENTATIONS = {
    'dot_product': functools.partial(attention.attention, impl='dot_product'),
    'chunked': functools.partial(attention.chunked_attention, chunk=4),
    'chunked_one_block': functools.partial(attention.attention, impl='chunked'),
    'splash': functools.partial(attention.attention, impl='splash'),
}


def _loss(attend, q, k, v):
  out = attend(q, k, v)
  return jnp.sum(out * jnp.cos(jnp.arange(out.size).reshape(out.shape)))  # Weighs every output.


@pytest.mark.parametrize('name', sorted(IMPLEMENTATIONS))
@pytest.mark.parametrize('heads, kv_heads', [(4, 2), (4, 4), (6, 1)])
def test_implementation_equals_xla_on_values_and_gradients(name, heads, kv_heads):
  length = 128 if name == 'splash' else 9  # The TPU kernel works on whole 128-long blocks.
  q, k, v = _qkv(1, length=length, heads=heads, kv_heads=kv_heads)
  xla = functools.partial(attention.attention, impl='xla')
  np.testing.assert_allclose(np.asarray(IMPLEMENTATIONS[name](q, k, v)),
                             np.asarray(xla(q, k, v)), rtol=1e-5, atol=1e-5)
  grads = jax.grad(functools.partial(_loss, IMPLEMENTATIONS[name]), argnums=(0, 1, 2))(q, k, v)
  expected = jax.grad(functools.partial(_loss, xla), argnums=(0, 1, 2))(q, k, v)
  for got, want in zip(grads, expected):
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-4, atol=1e-5)


def test_splash_at_a_length_its_blocks_do_not_divide_computes_the_same():
  """A model trained with splash (128-multiples) evaluated at other lengths, as long_eval's
  answer losses and generation's prompts are."""
  q, k, v = _qkv(4, length=124)
  np.testing.assert_allclose(np.asarray(attention.attention(q, k, v, 'splash')),
                             np.asarray(attention.attention(q, k, v, 'xla')), rtol=1e-5,
                             atol=1e-5)


@pytest.mark.parametrize('impl', ['xla', 'chunked'])
def test_grouped_query_attention_equals_mha_with_repeated_kv(impl):
  q, k, v = _qkv(2, heads=6, kv_heads=2)
  repeat = lambda x: jnp.repeat(x, 3, axis=2)  # Query head h reads KV head h // 3.
  np.testing.assert_allclose(np.asarray(attention.attention(q, k, v, impl)),
                             np.asarray(attention.attention(q, repeat(k), repeat(v), impl)),
                             rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize('impl', ['xla', 'chunked'])
def test_queries_over_a_kv_cache_equal_the_rows_of_full_attention(impl):
  """Sequence b's queries at positions offset[b].. over a 16-slot cache holding its keys
  (slots past them hold garbage, which must stay unseen) equal causal attention's rows."""
  q, k, v = _qkv(3, length=16)
  full = attention.attention(q, k, v, 'xla')
  offsets = jnp.array([5, 11])
  rows = jnp.stack([jnp.arange(o, o + 3) for o in offsets.tolist()])  # 3 queries each.
  queries = jnp.take_along_axis(q, rows[:, :, None, None], axis=1)
  garbage = 1e3 * (jnp.arange(16)[None, :, None, None] > rows[:, -1:, None, None])
  out = attention.attention(queries, k + garbage, v + garbage, impl, q_offset=offsets)
  np.testing.assert_allclose(np.asarray(out),
                             np.asarray(jnp.take_along_axis(full, rows[:, :, None, None], 1)),
                             rtol=1e-5, atol=1e-5)


def test_a_cache_resolves_to_an_implementation_that_takes_offsets():
  for impl in ('dot_product', 'splash', 'chunked'):
    assert attention.resolve(impl, cached=True) == 'chunked'
  assert attention.resolve('xla', cached=True) == 'xla'
  assert [attention.resolve('auto', platform=p) for p in ('tpu', 'gpu', 'cpu')] == [
      'splash', 'cudnn', 'chunked']
  for impl in ('auto', 'splash'):  # Splash's blocks do not divide 200: chunked computes it.
    assert attention.resolve(impl, platform='tpu', length=200) == 'chunked'
  # cuDNN's fused attention takes 16-bit dtypes only.
  assert [attention.resolve('auto', platform='gpu', dtype=dtype)
          for dtype in (jnp.bfloat16, jnp.float16, jnp.float32)] == ['cudnn', 'cudnn', 'chunked']
  with pytest.raises(ConfigError, match='model.attention_impl=cudnn runs on NVIDIA GPUs only'):
    attention.resolve('cudnn', platform='cpu')


def _temporaries(impl: str, length: int) -> int:
  """Compiled temporary bytes of one attention layer's forward and backward pass."""
  shape = jax.ShapeDtypeStruct((1, length, 4, 32), jnp.float32)
  step = jax.jit(jax.grad(functools.partial(lambda impl, q, k, v: jnp.sum(
      attention.attention(q, k, v, impl)), impl), argnums=(0, 1, 2)))
  return step.lower(shape, shape, shape).compile().memory_analysis().temp_size_in_bytes


def test_chunked_memory_grows_linearly_with_length_and_xla_quadratically():
  chunked = [_temporaries('chunked', n) for n in (1024, 2048, 4096)]
  xla = [_temporaries('xla', n) for n in (1024, 2048)]
  assert chunked[2] / chunked[1] < 2.2 and chunked[1] / chunked[0] < 2.2
  assert xla[1] / xla[0] > 3.5
  assert chunked[1] * 8 < xla[1]
