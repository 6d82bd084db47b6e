"""Every attention implementation against a NumPy reference and against `xla`, on values and
gradients; the KV-cache offsets; memory linear in length for `chunked`; the CPU kernel's build."""

import functools
import json
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gated_attention import attention, cpu_kernel
from gated_attention.config import ConfigError
from tests import helpers, reference


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
    'cpu_flash': functools.partial(attention.attention, impl='cpu_flash'),
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


@pytest.mark.parametrize('length, heads, kv_heads, head_dim', [
    (1, 2, 1, 8), (65, 6, 2, 20), (130, 4, 4, 64), (200, 3, 1, 40)])
def test_cpu_flash_equals_xla_across_blocks_and_padded_widths(length, heads, kv_heads, head_dim):
  """Lengths across the kernel's 64-row blocks and 16-wide vectors, head_dim padded to whole
  vectors, GQA groups of 1 to 3."""
  q, k, v = _qkv(5, batch=2, length=length, heads=heads, kv_heads=kv_heads, head_dim=head_dim)
  flash = functools.partial(attention.attention, impl='cpu_flash')
  xla = functools.partial(attention.attention, impl='xla')
  np.testing.assert_allclose(np.asarray(jax.jit(flash)(q, k, v)), np.asarray(xla(q, k, v)),
                             rtol=1e-5, atol=1e-6)
  grads = jax.jit(jax.grad(functools.partial(_loss, flash), argnums=(0, 1, 2)))(q, k, v)
  expected = jax.grad(functools.partial(_loss, xla), argnums=(0, 1, 2))(q, k, v)
  for got, want in zip(grads, expected):
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-4, atol=1e-5)


def test_cpu_flash_rows_far_below_any_mask_value_stay_causal():
  """Equal logits near -1e35 (below any finite mask value the kernel could have used): query i
  averages values 0..i exactly, as the formula says."""
  length, head_dim = 20, 16
  q = jnp.full((1, length, 1, head_dim), 1.58e17, jnp.float32)
  k = -q
  v = jnp.asarray(np.random.default_rng(6).normal(size=(1, length, 1, head_dim)), jnp.float32)
  expected = np.cumsum(np.asarray(v[0, :, 0]), axis=0) / np.arange(1, length + 1)[:, None]
  np.testing.assert_allclose(np.asarray(attention.attention(q, k, v, 'cpu_flash')[0, :, 0]),
                             expected, rtol=1e-5, atol=1e-6)


def test_cpu_flash_refuses_inputs_it_does_not_compute():
  q, k, v = _qkv(7, length=16, heads=4, kv_heads=2)
  for args in [(q, k[:, :5], v[:, :5]),  # Keys shorter than queries.
               (q[:, :, :3], k, v),  # Heads not a multiple of the KV heads.
               (q, k[..., :4], v[..., :4]),  # Another head_dim.
               (q, k.astype(jnp.bfloat16), v)]:
    with pytest.raises(ValueError, match='cpu_flash is causal self-attention in float32'):
      attention.cpu_flash_attention(*args)


_ON_A_MESH = r"""
import json
import jax, jax.numpy as jnp, numpy as np
from gated_attention import attention, sharding
from tests.test_attention import _loss, _qkv
mesh = sharding.make_mesh(dict(data=2, fsdp=1, tensor=2, expert=1))
errors = {}
for heads, kv_heads in [(6, 3), (4, 2)]:  # Tensor 2 splits 2 KV heads, not 3.
  q, k, v = _qkv(8, batch=2, length=128, heads=heads, kv_heads=kv_heads)
  value_and_grad = lambda impl: jax.jit(jax.value_and_grad(
      lambda q, k, v: _loss(lambda *a: attention.attention(*a, impl), q, k, v), (0, 1, 2)))
  want = value_and_grad('xla')(q, k, v)
  for impl in ('cpu_flash', 'splash'):
    with jax.set_mesh(mesh):
      got = value_and_grad(impl)(q, k, v)
    errors[f'{impl} {heads}/{kv_heads}'] = max(
        float(np.max(np.abs(np.asarray(a) - np.asarray(b))) / np.max(np.abs(np.asarray(b))))
        for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)))
print(json.dumps(errors))
"""


def test_kernels_on_a_mesh_equal_xla_where_tensor_does_not_split_the_kv_heads():
  """Each shard's query heads read their own KV heads: with 3 KV heads over tensor=2 the KV
  heads are repeated to the query heads before the kernels run per shard."""
  result = subprocess.run([sys.executable, '-c', _ON_A_MESH], capture_output=True, text=True,
                          timeout=300, env=helpers.env(4))
  assert result.returncode == 0, result.stderr[-3000:]
  errors = json.loads(result.stdout.strip().splitlines()[-1])
  assert len(errors) == 4 and max(errors.values()) < 1e-5, errors


def _fake_compiler(tmp_path, body: str) -> str:
  path = tmp_path / 'c++'
  path.write_text(f'#!/bin/sh\nif [ "$1" = --version ]; then echo fake 1.0; exit 0; fi\n{body}\n')
  path.chmod(0o755)
  return str(path)


def test_cpu_kernel_that_cannot_be_built_is_named_and_auto_falls_back(tmp_path, monkeypatch):
  monkeypatch.setenv('GATED_ATTENTION_CACHE', str(tmp_path / 'cache'))
  try:
    monkeypatch.setenv('CXX', str(tmp_path / 'missing'))
    cpu_kernel.build_error.cache_clear()
    assert 'no C++ compiler' in cpu_kernel.build_error()
    assert attention.resolve('auto', platform='cpu') == 'chunked'
    with pytest.raises(ConfigError, match='cpu_flash: the CPU kernel cannot run here: no C'):
      attention.resolve('cpu_flash', platform='cpu')
    # A failed build names the command and the compiler's words, and leaves no file behind.
    monkeypatch.setenv('CXX', _fake_compiler(tmp_path, 'echo "error: no vectors" >&2; exit 1'))
    cpu_kernel.build_error.cache_clear()
    assert 'failed (exit status 1): error: no vectors' in cpu_kernel.build_error()
    assert list((tmp_path / 'cache' / 'kernels').iterdir()) == []
  finally:
    monkeypatch.undo()
    cpu_kernel.build_error.cache_clear()  # The next use finds the real library again.
  assert cpu_kernel.build_error() is None


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


@pytest.mark.parametrize('impl', [
    functools.partial(attention.attention, impl='xla'),
    functools.partial(attention.attention, impl='chunked'),  # One key block on CPUs.
    functools.partial(attention.chunked_attention, chunk=4),  # Four, the last ones skipped.
], ids=['xla', 'chunked', 'chunked_blocks'])
def test_queries_over_a_kv_cache_equal_the_rows_of_full_attention(impl):
  """Sequence b's queries at positions offset[b].. over a 16-slot cache holding its keys
  (slots past them hold garbage, which must stay unseen) equal causal attention's rows."""
  q, k, v = _qkv(3, length=16)
  full = attention.attention(q, k, v, 'xla')
  offsets = jnp.array([5, 11])
  rows = jnp.stack([jnp.arange(o, o + 3) for o in offsets.tolist()])  # 3 queries each.
  queries = jnp.take_along_axis(q, rows[:, :, None, None], axis=1)
  garbage = 1e3 * (jnp.arange(16)[None, :, None, None] > rows[:, -1:, None, None])
  out = impl(queries, k + garbage, v + garbage, q_offset=offsets)
  np.testing.assert_allclose(np.asarray(out),
                             np.asarray(jnp.take_along_axis(full, rows[:, :, None, None], 1)),
                             rtol=1e-5, atol=1e-5)


def test_a_cache_resolves_to_an_implementation_that_takes_offsets():
  for impl in ('dot_product', 'splash', 'chunked', 'cpu_flash'):
    assert attention.resolve(impl, cached=True) == 'chunked'
  assert attention.resolve('xla', cached=True) == 'xla'
  assert [attention.resolve('auto', platform=p) for p in ('tpu', 'gpu', 'cpu')] == [
      'splash', 'cudnn', 'cpu_flash']
  # The CPU kernel computes in float32; other dtypes run chunked.
  assert [attention.resolve('auto', platform='cpu', dtype=dtype)
          for dtype in (jnp.float32, jnp.bfloat16)] == ['cpu_flash', 'chunked']
  with pytest.raises(ValueError, match='cpu_flash is causal self-attention in float32'):
    attention.attention(*(x.astype(jnp.bfloat16) for x in _qkv(9)), 'cpu_flash')
  with pytest.raises(ConfigError, match='model.attention_impl=cpu_flash runs on CPUs only'):
    attention.resolve('cpu_flash', platform='tpu')
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


@pytest.mark.parametrize('impl, platform, runs_as', [
    ('cudnn', 'gpu', 'cudnn'), ('cudnn', 'cpu', 'auto'), ('cpu_flash', 'cpu', 'cpu_flash'),
    ('cpu_flash', 'tpu', 'auto'), ('splash', 'cpu', 'auto'), ('splash', 'tpu', 'splash'),
    ('xla', 'tpu', 'xla'),
    ('chunked', 'gpu', 'chunked')])
def test_a_kernel_of_another_platform_is_read_as_auto(impl, platform, runs_as):
  assert attention.runnable_here(impl, platform) == runs_as
