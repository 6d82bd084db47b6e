"""What only an NVIDIA GPU shows: cuDNN's fused attention (`cudnn`) against `xla`, alone and
inside the model. Skipped elsewhere; on a GPU:

  JAX_PLATFORMS=cuda XLA_PYTHON_CLIENT_PREALLOCATE=false pytest -n0 tests/test_gpu.py

The kernel takes 16-bit inputs only, so it is held to the float32 answer on the same
(bfloat16-rounded) inputs within a relative error of 1e-2: bfloat16 rounding of the output and
of the kernel's probabilities gives 1.9e-3 to 3.9e-3 here (`xla` and `chunked` in bfloat16 on a
CPU), while a wrong mask, head pairing or scale gives errors of order one.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from gated_attention import attention
from tests import helpers
from tests.test_attention import _loss, _qkv

pytestmark = pytest.mark.skipif(
    jax.default_backend() != 'gpu',
    reason='cuDNN runs on NVIDIA GPUs: JAX_PLATFORMS=cuda pytest -n0 tests/test_gpu.py')
TOLERANCE = 1e-2  # Relative error of one attention call in bfloat16.


def _relative_error(got, want) -> float:
  got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
  return float(np.linalg.norm(got - want) / np.linalg.norm(want))


@pytest.mark.parametrize('heads, kv_heads, head_dim', [(4, 2, 64), (4, 4, 128), (8, 1, 64)])
def test_cudnn_equals_xla_on_values_and_gradients(heads, kv_heads, head_dim):
  q, k, v = (x.astype(jnp.bfloat16) for x in _qkv(
      2, batch=2, length=256, heads=heads, kv_heads=kv_heads, head_dim=head_dim))
  exact = [x.astype(jnp.float32) for x in (q, k, v)]
  cudnn = functools.partial(attention.attention, impl='cudnn')
  xla = functools.partial(attention.attention, impl='xla')
  assert _relative_error(cudnn(q, k, v), xla(*exact)) < TOLERANCE
  grads = jax.grad(functools.partial(_loss, cudnn), argnums=(0, 1, 2))(q, k, v)
  expected = jax.grad(functools.partial(_loss, xla), argnums=(0, 1, 2))(*exact)
  for name, got, want in zip('qkv', grads, expected):
    assert _relative_error(got, want) < TOLERANCE, name


def _compiled_model(impl: str, dtype: str = 'bfloat16'):
  """A tiny G1 model, jitted (run op by op, a GPU compiles every operation apart: minutes):
  (tokens -> logits, tokens -> gradients of the logits' mean square for every parameter).
  The same weights for every implementation and dtype (one seed)."""
  graphdef, params = nnx.split(helpers.transformer(helpers.model_config(
      'g1_elementwise', attention_impl=impl, dtype=dtype, head_dim=64)))
  logits = lambda p, tokens: nnx.merge(graphdef, p)(tokens).logits
  loss = lambda p, tokens: jnp.mean(logits(p, tokens).astype(jnp.float32) ** 2)
  forward, backward = jax.jit(logits), jax.jit(jax.grad(loss))
  return (lambda tokens: forward(params, tokens),
          lambda tokens: jax.tree.leaves(backward(params, tokens)))


def test_a_gated_model_with_cudnn_is_causal_and_as_close_to_float32_as_xla_in_bfloat16():
  """In a whole bfloat16 model the rounding compounds (1-3% against float32 on logits and
  parameter gradients), so cuDNN is held to xla's own bfloat16 error: within twice it (0.75x
  to 1.3x for `chunked` against `xla` on a CPU)."""
  (cudnn, cudnn_grads), (xla, xla_grads), (exact, exact_grads) = (
      _compiled_model('cudnn'), _compiled_model('xla'), _compiled_model('xla', 'float32'))
  tokens = helpers.random_tokens(0, batch=2, length=128)
  changed = tokens.at[:, 64:].set(helpers.random_tokens(1, batch=2, length=128)[:, 64:])
  before, after = cudnn(tokens), cudnn(changed)
  np.testing.assert_array_equal(np.asarray(before[:, :64]), np.asarray(after[:, :64]))
  reference = exact(tokens)
  assert _relative_error(before, reference) < 2 * _relative_error(xla(tokens), reference)
  for got, bfloat16, want in zip(cudnn_grads(tokens), xla_grads(tokens), exact_grads(tokens)):
    assert _relative_error(got, want) < 2 * _relative_error(bfloat16, want)
