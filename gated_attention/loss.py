"""The output layer and the next-token loss, a chunk of positions at a time.

At the paper's scale the float32 logits are the largest tensor of a step (16 sequences of 4,096
tokens over a 151,936-id vocabulary are 40 GB, and autodiff keeps their gradient too).
`next_token_loss` never holds more than one chunk of them: it runs over chunks of positions
under lax.scan and, when differentiated, gets each chunk's gradients in the same pass (the
gradient of the summed cross-entropy with respect to the logits is softmax minus one-hot), so
nothing is recomputed and the backward pass only scales what the forward pass left.

On a mesh each device runs the chunks on its own shards (shard_map): its rows of the batch and
its slice of the vocabulary (the logsumexp and the targets' logits summed over the devices that
split the vocabulary), with the output kernel gathered over its rows once per call. The kernel's
gradient is summed over chunks on each device and reduce-scattered once, after the last chunk.
Left to the partitioner, every chunk gathered the kernel again and all-reduced its whole float32
gradient: for `dense_1p7b_28l` on v5p:4x4x4, 16 collectives of 0.6 and 1.2 GB per microbatch
where there are now 2.
"""

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec

from gated_attention.sharding import constrain, logical_to_spec

KERNEL_AXES = ('embed', 'vocab')  # The output kernel's logical axes.


def output_logits(x: jax.Array, kernel: jax.Array) -> jax.Array:
  """float32 logits [batch, length, vocab] of final hidden states x [batch, length, d_model]
  under the output kernel [d_model, vocab] (the embedding, transposed, when tied)."""
  logits = jnp.einsum('btd,dv->btv', x, kernel, preferred_element_type=jnp.float32)
  return constrain(logits, ('batch', 'length', 'vocab'))


def _sum_over(x: jax.Array, axes: tuple[str, ...]) -> jax.Array:
  return jax.lax.psum(x, axes) if axes else x


def _chunk_loss(x, kernel, targets, mask, vocab_axes):
  """(summed cross-entropy over the positions where mask is True, logits, logsumexp) of one
  chunk, on this device's slice of the vocabulary (the output kernel's columns, vocab_axes
  sharding them; () for all of it). Logits are this slice's; the logsumexp and the targets'
  logits are over the whole vocabulary."""
  logits = jnp.einsum('btd,dv->btv', x, kernel, preferred_element_type=jnp.float32)
  top = jnp.max(logits, axis=-1)
  if vocab_axes:
    top = jax.lax.pmax(top, vocab_axes)
  lse = top + jnp.log(_sum_over(jnp.sum(jnp.exp(logits - top[..., None]), axis=-1), vocab_axes))
  local_targets = _local_ids(targets, logits.shape[-1], vocab_axes)
  picked = jnp.take_along_axis(logits, jnp.clip(local_targets, 0, logits.shape[-1] - 1)[..., None],
                               axis=-1)[..., 0]
  in_slice = (local_targets >= 0) & (local_targets < logits.shape[-1])
  target_logits = _sum_over(jnp.where(in_slice, picked, 0.0), vocab_axes)
  losses = lse - target_logits
  return jnp.sum(jnp.where(mask, losses, 0.0)), logits, lse


def _local_ids(targets, vocab_slice: int, vocab_axes):
  """Targets as indices into this device's slice of the vocabulary (outside it: < 0 or >= the
  slice)."""
  return targets - jax.lax.axis_index(vocab_axes) * vocab_slice if vocab_axes else targets


def _chunks(a: jax.Array, chunk: int) -> jax.Array:
  """[batch, length, ...] -> [length // chunk, batch, chunk, ...]."""
  return jnp.swapaxes(a.reshape(a.shape[0], -1, chunk, *a.shape[2:]), 0, 1)


def _unchunk(a: jax.Array) -> jax.Array:
  """The inverse of _chunks."""
  a = jnp.swapaxes(a, 0, 1)
  return a.reshape(a.shape[0], -1, *a.shape[3:])


class _Layout(NamedTuple):
  """Where the loss's inputs live on the mesh: the mesh axes that split the activations' and
  targets' batch, and the output kernel's rows and columns (all () off a mesh)."""
  batch_axes: tuple[str, ...] = ()
  embed_axes: tuple[str, ...] = ()
  vocab_axes: tuple[str, ...] = ()


def _layout(kernel_shape) -> _Layout:
  """The loss's layout on the current mesh; mesh axes of size 1 are left out."""
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty:
    return _Layout()

  def axes(entry) -> tuple[str, ...]:  # Those of a spec entry that split something.
    entry = () if entry is None else (entry,) if isinstance(entry, str) else entry
    return tuple(axis for axis in entry if mesh.shape[axis] > 1)

  kernel_spec = logical_to_spec(KERNEL_AXES, kernel_shape, mesh)
  layout = _Layout(axes(logical_to_spec(('batch',), mesh=mesh)[0]), axes(kernel_spec[0]),
                   axes(kernel_spec[1]))
  assert set(layout.embed_axes) <= set(layout.batch_axes), (
      f'the output kernel\'s rows are sharded over {layout.embed_axes}, which do not all split '
      f'the batch {layout.batch_axes}: their gradient could not be reduce-scattered')
  return layout


def _on_shards(layout: _Layout, local, x, kernel, targets, mask, outputs):
  """Runs local(x, kernel, targets, mask) on each device's shards: the batch rows of x [batch,
  length, d_model] and targets and mask [batch, length], the kernel's vocabulary slice, the
  kernel gathered whole over its rows. outputs: which of (total, grad_x, grad_kernel) local
  returns; each comes back laid out as its input is (the total replicated)."""
  def gathered(x, kernel, targets, mask):
    if layout.embed_axes:
      kernel = jax.lax.all_gather(kernel, layout.embed_axes, axis=0, tiled=True)
    return local(x, kernel, targets, mask)

  if not jax.sharding.get_abstract_mesh().empty:
    rows = PartitionSpec(layout.batch_axes or None)
    kernel_spec = PartitionSpec(layout.embed_axes or None, layout.vocab_axes or None)
    specs = {'total': PartitionSpec(), 'grad_x': rows, 'grad_kernel': kernel_spec}
    gathered = jax.shard_map(gathered, in_specs=(rows, kernel_spec, rows, rows),
                             out_specs=tuple(specs[name] for name in outputs), check_vma=False)
  return gathered(x, kernel, targets, mask)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5))
def _summed_loss(x, kernel, targets, mask, chunk, layout):
  def local(x, kernel, targets, mask):
    def add(total, part):
      x_part, targets_part, mask_part = part
      loss = _chunk_loss(x_part, kernel, targets_part, mask_part, layout.vocab_axes)[0]
      return total + loss, None
    total, _ = jax.lax.scan(add, jnp.zeros((), jnp.float32),
                            tuple(_chunks(a, chunk) for a in (x, targets, mask)))
    return (_sum_over(total, layout.batch_axes),)
  return _on_shards(layout, local, x, kernel, targets, mask, ('total',))[0]


def _summed_loss_forward(x, kernel, targets, mask, chunk, layout):
  def local(x, kernel, targets, mask):
    def add(carry, part):
      total, grad_kernel = carry
      x_part, targets_part, mask_part = part
      loss, logits, lse = _chunk_loss(x_part, kernel, targets_part, mask_part, layout.vocab_axes)
      one_hot = jax.nn.one_hot(_local_ids(targets_part, logits.shape[-1], layout.vocab_axes),
                               logits.shape[-1], dtype=jnp.float32)  # Zero outside the slice.
      grad_logits = jnp.where(mask_part[..., None], jnp.exp(logits - lse[..., None]) - one_hot,
                              0.0).astype(x.dtype)
      grad_x = jnp.einsum('btv,dv->btd', grad_logits, kernel, preferred_element_type=jnp.float32)
      grad_kernel += jnp.einsum('btd,btv->dv', x_part, grad_logits,
                                preferred_element_type=jnp.float32)
      return (total + loss, grad_kernel), _sum_over(grad_x, layout.vocab_axes).astype(x.dtype)

    # This device's rows' share of the kernel's gradient, summed over chunks here and over the
    # batch's devices once, after the last chunk.
    start = (jnp.zeros((), jnp.float32), jnp.zeros(kernel.shape, jnp.float32))
    (total, grad_kernel), grad_x = jax.lax.scan(
        add, start, tuple(_chunks(a, chunk) for a in (x, targets, mask)))
    if layout.embed_axes:
      grad_kernel = jax.lax.psum_scatter(grad_kernel, layout.embed_axes, scatter_dimension=0,
                                         tiled=True)
    grad_kernel = _sum_over(grad_kernel, tuple(axis for axis in layout.batch_axes
                                               if axis not in layout.embed_axes))
    return (_sum_over(total, layout.batch_axes), _unchunk(grad_x),
            grad_kernel.astype(kernel.dtype))

  total, grad_x, grad_kernel = _on_shards(layout, local, x, kernel, targets, mask,
                                          ('total', 'grad_x', 'grad_kernel'))
  return total, (grad_x, grad_kernel)


def _summed_loss_backward(chunk, layout, gradients, cotangent):
  del chunk, layout
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
  return _summed_loss(x, kernel, targets, mask, chunk, _layout(kernel.shape)), jnp.sum(mask)
