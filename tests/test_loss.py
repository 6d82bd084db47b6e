"""The output layer's next-token loss, whole and a chunk of positions at a time, against NumPy."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gated_attention import config as config_lib
from gated_attention import loss as loss_lib
from gated_attention.train import compiled_memory

PAD = 3


def _inputs(batch=2, length=8, d_model=6, vocab=11, seed=0):
  rng = np.random.default_rng(seed)
  x = rng.normal(size=(batch, length, d_model)).astype(np.float32)
  kernel = rng.normal(size=(d_model, vocab)).astype(np.float32)
  targets = rng.integers(0, vocab, size=(batch, length)).astype(np.int32)
  targets[0, :3] = PAD
  return x, kernel, targets


def _reference(x, kernel, targets, pad_id):
  """Summed cross-entropy, count, and its gradients for x and kernel, from the formula in
  float64: loss = logsumexp(z) - z[target] with z = x W; dL/dz = softmax(z) - one_hot."""
  x, kernel = x.astype(np.float64), kernel.astype(np.float64)
  z = x @ kernel
  z_max = z.max(-1, keepdims=True)
  lse = np.log(np.exp(z - z_max).sum(-1)) + z_max[..., 0]
  mask = np.ones(targets.shape, bool) if pad_id is None else targets != pad_id
  losses = lse - np.take_along_axis(z, targets[..., None], -1)[..., 0]
  grad_z = np.exp(z - lse[..., None]) - np.eye(kernel.shape[1])[targets]
  grad_z *= mask[..., None]
  return (np.sum(losses * mask), mask.sum(), grad_z @ kernel.T,
          np.einsum('btd,btv->dv', x, grad_z))


@pytest.mark.parametrize('chunk', [0, 8, 2])
@pytest.mark.parametrize('pad_id', [None, PAD])
def test_loss_and_gradients_match_the_formula(chunk, pad_id):
  x, kernel, targets = _inputs()
  loss_sum, num_tokens, grad_x, grad_kernel = _reference(x, kernel, targets, pad_id)
  got = jax.jit(lambda x, k: loss_lib.next_token_loss(x, k, targets, pad_id, chunk))(x, kernel)
  np.testing.assert_allclose(got[0], loss_sum, rtol=1e-5)
  assert int(got[1]) == num_tokens
  # d(3 * loss_sum): the backward pass scales by the incoming cotangent.
  grads = jax.grad(lambda x, k: 3 * loss_lib.next_token_loss(x, k, targets, pad_id, chunk)[0],
                   argnums=(0, 1))(jnp.asarray(x), jnp.asarray(kernel))
  np.testing.assert_allclose(grads[0], 3 * grad_x, rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(grads[1], 3 * grad_kernel, rtol=1e-4, atol=1e-5)


def test_bfloat16_inputs_give_bfloat16_gradients_close_to_float32():
  x, kernel, targets = _inputs(d_model=16, vocab=64)
  loss = lambda x, k: loss_lib.next_token_loss(x, k, targets, PAD, 4)[0]
  exact = jax.grad(loss, argnums=(0, 1))(jnp.asarray(x), jnp.asarray(kernel))
  low = jax.grad(loss, argnums=(0, 1))(jnp.asarray(x, jnp.bfloat16),
                                       jnp.asarray(kernel, jnp.bfloat16))
  for got, want in zip(low, exact):
    assert got.dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(got, np.float32), want, rtol=0.05, atol=0.05)


def test_a_chunk_that_does_not_divide_the_length_is_named():
  x, kernel, targets = _inputs()
  with pytest.raises(ValueError, match='model.loss_chunk=3 must divide the sequence length 8'):
    loss_lib.next_token_loss(x, kernel, targets, None, 3)
  config = config_lib.base_config()
  config.data.seq_len, config.model.loss_chunk = 64, 24
  with pytest.raises(config_lib.ConfigError, match='model.loss_chunk=24 must be 0 .* divide '
                     'data.seq_len=64'):
    config_lib.validate(config)


def test_chunks_keep_only_one_chunk_of_logits_alive():
  """Compiled memory of the loss's gradient: whole [4, 512, 4096] float32 logits (32 MiB, and
  their gradient) against 32-position chunks (2 MiB each)."""
  x, kernel, targets = _inputs(batch=4, length=512, d_model=32, vocab=4096)
  def temporaries(chunk):
    grad = jax.jit(jax.grad(lambda x, k: loss_lib.next_token_loss(x, k, targets, None, chunk)[0],
                            argnums=(0, 1)))
    return compiled_memory(grad.lower(x, kernel).compile())['temporaries']
  whole, chunked = temporaries(0), temporaries(32)
  assert whole > 32 * 2**20 > 4 * chunked, (whole, chunked)
