"""The output layer and the next-token loss, a chunk of positions at a time.

At the paper's scale the float32 logits are the largest tensor of a step (16 sequences of 4,096
tokens over a 151,936-id vocabulary are 40 GB, and autodiff keeps their gradient too).
`next_token_loss` never holds more than one chunk of them: it runs over chunks of positions
under lax.scan and, when differentiated, gets each chunk's gradients in the same pass (the
gradient of the summed cross-entropy with respect to the logits is softmax minus one-hot), so
nothing is recomputed and the backward pass only scales what the forward pass left.
"""

import functools

import jax
import jax.numpy as jnp

from gated_attention.sharding import constrain

KERNEL_AXES = ('embed', 'vocab')  # The output kernel's logical axes.


def output_logits(x: jax.Array, kernel: jax.Array) -> jax.Array:
  """float32 logits [batch, length, vocab] of final hidden states x [batch, length, d_model]
  under the output kernel [d_model, vocab] (the embedding, transposed, when tied)."""
  logits = jnp.einsum('btd,dv->btv', x, kernel, preferred_element_type=jnp.float32)
  return constrain(logits, ('batch', 'length', 'vocab'))


def _chunk_loss(x, kernel, targets, mask):
  """(summed cross-entropy over the positions where mask is True, logits, logsumexp)."""
  logits = output_logits(x, kernel)
  lse = jax.nn.logsumexp(logits, axis=-1)
  losses = lse - jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
  return jnp.sum(jnp.where(mask, losses, 0.0)), logits, lse


def _chunks(a: jax.Array, chunk: int) -> jax.Array:
  """[batch, length, ...] -> [length // chunk, batch, chunk, ...]."""
  return jnp.swapaxes(a.reshape(a.shape[0], -1, chunk, *a.shape[2:]), 0, 1)


def _unchunk(a: jax.Array) -> jax.Array:
  """The inverse of _chunks."""
  a = jnp.swapaxes(a, 0, 1)
  return a.reshape(a.shape[0], -1, *a.shape[3:])


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def _summed_loss(x, kernel, targets, mask, chunk):
  def add(total, part):
    x_part, targets_part, mask_part = part
    return total + _chunk_loss(x_part, kernel, targets_part, mask_part)[0], None
  total, _ = jax.lax.scan(add, jnp.zeros((), jnp.float32),
                          tuple(_chunks(a, chunk) for a in (x, targets, mask)))
  return total


def _summed_loss_forward(x, kernel, targets, mask, chunk):
  def add(carry, part):
    total, grad_kernel = carry
    x_part, targets_part, mask_part = part
    loss, logits, lse = _chunk_loss(x_part, kernel, targets_part, mask_part)
    one_hot = jax.nn.one_hot(targets_part, logits.shape[-1], dtype=jnp.float32)
    grad_logits = jnp.where(mask_part[..., None], jnp.exp(logits - lse[..., None]) - one_hot, 0.0)
    grad_logits = constrain(grad_logits.astype(x.dtype), ('batch', 'length', 'vocab'))
    grad_x = jnp.einsum('btv,dv->btd', grad_logits, kernel, preferred_element_type=jnp.float32)
    grad_kernel += jnp.einsum('btd,btv->dv', x_part, grad_logits,
                              preferred_element_type=jnp.float32)
    return (total + loss, constrain(grad_kernel, KERNEL_AXES)), grad_x.astype(x.dtype)

  # The kernel's gradient is summed over chunks sharded as the kernel is.
  start = (jnp.zeros((), jnp.float32),
           constrain(jnp.zeros(kernel.shape, jnp.float32), KERNEL_AXES))
  (total, grad_kernel), grad_x = jax.lax.scan(
      add, start, tuple(_chunks(a, chunk) for a in (x, targets, mask)))
  return total, (_unchunk(grad_x), grad_kernel.astype(kernel.dtype))


def _summed_loss_backward(chunk, gradients, cotangent):
  del chunk
  grad_x, grad_kernel = gradients
  return ((cotangent * grad_x).astype(grad_x.dtype),
          (cotangent * grad_kernel).astype(grad_kernel.dtype), None, None)


_summed_loss.defvjp(_summed_loss_forward, _summed_loss_backward)


def target_mask(targets: jax.Array, pad_id: int | None) -> jax.Array:
  """Where targets count in the loss: everywhere but pad_id (None: there is none)."""
  return jnp.ones(targets.shape, bool) if pad_id is None else targets != pad_id


def next_token_loss(x: jax.Array, kernel: jax.Array, targets: jax.Array, pad_id: int | None,
                    chunk: int = 0) -> tuple[jax.Array, jax.Array]:
  """(summed cross-entropy, number of counted targets) of the logits output_logits(x, kernel)
  against targets int [batch, length]; targets equal to pad_id (None: there is none) do not
  count. chunk: positions per chunk (0: all at once); it must divide the length."""
  length = targets.shape[1]
  chunk = chunk or length
  if length % chunk:
    raise ValueError(f'model.loss_chunk={chunk} must divide the sequence length {length}.')
  mask = target_mask(targets, pad_id)
  return _summed_loss(x, kernel, targets, mask, chunk), jnp.sum(mask)
