"""Scaled dot-product attention (SDPA): every implementation behind one signature, chosen in one
place (`resolve`). The gate sits outside, in the attention block, so every gate variant works
with every implementation.

    implementation(q, k, v, q_offset) -> out [batch, q_len, heads, head_dim]

q: [batch, q_len, heads, head_dim]; k, v: [batch, kv_len, kv_heads, head_dim]; query head h
reads KV head h // (heads // kv_heads) (grouped-query attention); scale head_dim ** -0.5;
logits and softmax in float32.
q_offset None is causal self-attention (q_len == kv_len, query i sees keys 0..i). An int array
[batch] places query i of sequence b at position q_offset[b] + i over a KV cache whose slot j
holds position j: it sees slots 0..q_offset[b] + i.

  xla          explicit softmax over the whole [q_len, kv_len] logits; the reference, and the
               one that returns attention probabilities (the paper's measurements).
  dot_product  jax.nn.dot_product_attention with XLA's own choice of kernel.
  cudnn        jax.nn.dot_product_attention(implementation='cudnn'): cuDNN flash attention
               (NVIDIA GPUs, 16-bit dtypes).
  chunked      blockwise attention with an online softmax and a custom VJP that recomputes each
               block in the backward pass (FlashAttention-2's algorithm) in plain JAX: memory
               linear in length on any backend, and masked blocks above the diagonal skipped.
  splash       the Pallas TPU splash-attention kernel (forward and backward), run per shard
               with shard_map over the batch and head mesh axes; in Pallas interpret mode
               elsewhere (tests).
  cpu_flash    a compiled C++ kernel of the same algorithm for CPUs in float32
               (`cpu_kernel`: built on first use with the host's compiler), run per shard as
               splash is.
  auto         splash on TPU, cudnn on GPU in 16-bit dtypes (chunked in float32, which cuDNN's
               kernel refuses), cpu_flash on CPU in float32 (the fastest there: see README;
               chunked in other dtypes or where the kernel cannot be built).
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax.ad_checkpoint import checkpoint_name

from gated_attention import cpu_kernel
from gated_attention.config import CUDNN_DTYPES, SPLASH_BLOCK, ConfigError
from gated_attention.sharding import constrain, logical_to_spec, splits_evenly, target_platform

# Implementations that take a q_offset (a KV cache); the others serve training and prefill.
CACHE_IMPLEMENTATIONS = ('xla', 'chunked')
AUTO = {'tpu': 'splash', 'gpu': 'cudnn', 'cpu': 'cpu_flash'}
# Kernels of one platform (splash runs elsewhere interpreted, far too slowly to evaluate with).
_PLATFORM_ONLY = {'cudnn': 'gpu', 'cpu_flash': 'cpu', 'splash': 'tpu'}
# Block length of `chunked` along queries and keys: 128, but 64 on CPUs below 1,024 tokens
# (measured, one layer's forward and backward, 16 x 256 tokens: 47 ms with 64, 56 with 32, 67
# with 128; from 1,024 tokens on 128 is as fast or faster).
CHUNK, SHORT_CPU_CHUNK = 128, 64
_MASKED = -0.7 * float(np.finfo(np.float32).max)  # Finite: exp(masked - max) is exactly 0.
# What a fused implementation keeps for its backward pass (its output and the softmax's
# log-sum-exp) comes from its forward kernel; a remat policy that saves it (model.remat=save_dots)
# spares the backward pass a second run of that kernel, for about one more activation per layer.
# The kernels of `chunked` and `cpu_flash` name it RESIDUALS; cuDNN's and splash's are
# primitives of jax.
RESIDUALS = 'attention_residuals'
_KERNEL_PRIMITIVES = ('dot_product_attention_fwd_wrapper', 'pallas_call')


def kernel_outputs_saveable(primitive, *_, **__) -> bool:
  """A remat policy: keep the outputs of cuDNN's forward attention and of Pallas kernels
  (splash; the MoE's megablox products on TPU, whose outputs save_dots keeps anyway)."""
  return primitive.name in _KERNEL_PRIMITIVES


def resolve(impl: str, cached: bool = False, platform: str | None = None,
            length: int | None = None, dtype=None) -> str:
  """The implementation to run: 'auto' by platform (chunked where cuDNN or the CPU kernel
  does not take the dtype, or the CPU kernel cannot be built); chunked, which computes the same,
  where splash's blocks do not divide the length (training lengths are validated; evaluation
  and generation run others); with a KV cache, one that takes offsets."""
  platform = platform or target_platform()
  dtype_name = None if dtype is None else jnp.dtype(dtype).name
  if impl == 'auto':
    impl = AUTO.get(platform, 'xla')
    if impl == 'cudnn' and dtype_name not in (None, *CUDNN_DTYPES):
      impl = 'chunked'
    if impl == 'cpu_flash' and (dtype_name not in (None, 'float32') or cpu_kernel.build_error()):
      impl = 'chunked'
  if impl == 'splash' and length is not None and length % SPLASH_BLOCK:
    impl = 'chunked'
  if impl == 'cudnn' and platform != 'gpu':
    raise ConfigError(f'model.attention_impl=cudnn runs on NVIDIA GPUs only; this program is '
                      f'compiled for {platform}: choose auto, chunked, xla or dot_product.')
  if cached and impl not in CACHE_IMPLEMENTATIONS:
    return 'chunked'
  if impl == 'cpu_flash':
    _check_cpu_flash(platform)
  return impl


def runnable_here(impl: str, platform: str | None = None) -> str:
  """impl, or 'auto' where impl is another platform's kernel (a run trained on GPUs with cudnn,
  evaluated on CPUs): every implementation computes the same function."""
  platform = platform or target_platform()
  return 'auto' if _PLATFORM_ONLY.get(impl, platform) != platform else impl


def _check_cpu_flash(platform: str) -> None:
  """Refuses an explicit cpu_flash off CPUs or where its kernel cannot be built (its inputs'
  dtype is checked by `cpu_flash_attention`, model.dtype by config validation)."""
  if platform != 'cpu':
    raise ConfigError(f'model.attention_impl=cpu_flash runs on CPUs only; this program is '
                      f'compiled for {platform}: choose auto, chunked, xla or dot_product.')
  error = cpu_kernel.build_error()
  if error:
    raise ConfigError(f'model.attention_impl=cpu_flash: the CPU kernel cannot run here: {error}. '
                      'Choose auto (chunked where the kernel cannot be built) or chunked.')


def attention(q, k, v, impl: str, q_offset=None):
  """SDPA with the named implementation (see the module docstring); `impl` is resolved here."""
  impl = resolve(impl, cached=q_offset is not None, length=q.shape[1], dtype=q.dtype)
  return _IMPLEMENTATIONS[impl](q, k, v, q_offset)


def _positions(q_len: int, q_offset):
  """Query positions [batch or 1, q_len]."""
  offset = jnp.zeros((1,), jnp.int32) if q_offset is None else q_offset.astype(jnp.int32)
  return offset[:, None] + jnp.arange(q_len, dtype=jnp.int32)[None, :]


def _grouped(q, kv_heads: int):
  """[b, t, heads, d] -> [b, kv_heads, group, t, d]."""
  batch, length, heads, head_dim = q.shape
  q = q.reshape(batch, length, kv_heads, heads // kv_heads, head_dim)
  return q.transpose(0, 2, 3, 1, 4)


def _ungrouped(out):
  """[b, kv_heads, group, t, d] -> [b, t, heads, d]."""
  batch, kv_heads, group, length, head_dim = out.shape
  return out.transpose(0, 3, 1, 2, 4).reshape(batch, length, kv_heads * group, head_dim)


def softmax_attention(q, k, v, q_offset=None):
  """The `xla` implementation; returns (out, probabilities [batch, heads, q_len, kv_len])."""
  batch, q_len, heads, head_dim = q.shape
  kv_heads = k.shape[2]
  logits = jnp.einsum('bkgqd,bskd->bkgqs', _grouped(q, kv_heads), k,
                      preferred_element_type=jnp.float32) * head_dim ** -0.5
  visible = _positions(q_len, q_offset)[:, :, None] >= jnp.arange(k.shape[1])[None, None, :]
  logits = jnp.where(visible[:, None, None], logits, _MASKED)
  probs = jax.nn.softmax(logits, axis=-1)
  out = _ungrouped(jnp.einsum('bkgqs,bskd->bkgqd', probs.astype(v.dtype), v))
  return out, probs.reshape(batch, heads, q_len, k.shape[1])


def _dot_product(implementation):
  def attend(q, k, v, q_offset):
    assert q_offset is None, 'a KV cache resolves to a cache implementation'
    return jax.nn.dot_product_attention(q, k, v, is_causal=True, implementation=implementation)
  return attend


# ---- chunked: FlashAttention-2 in plain JAX ------------------------------------------------


def _pad_to(x, axis: int, multiple: int):
  pad = -x.shape[axis] % multiple
  if not pad:
    return x
  widths = [(0, 0)] * x.ndim
  widths[axis] = (0, pad)
  return jnp.pad(x, widths)


def _block(x, index, size: int, axis: int):
  return jax.lax.dynamic_slice_in_dim(x, index * size, size, axis)


def _block_logits(q_block, k_block, q_pos, k_start):
  """Masked float32 logits [b, kv, g, bq, bk] of one block pair (q comes scaled); q_pos
  [b, bq]."""
  logits = jnp.einsum('bkgqd,bksd->bkgqs', q_block, k_block,
                      preferred_element_type=jnp.float32)
  k_pos = k_start + jnp.arange(k_block.shape[2])
  visible = q_pos[:, :, None] >= k_pos[None, None, :]
  return jnp.where(visible[:, None, None], logits, _MASKED)


def _chunked_forward(q, k, v, q_pos, chunks):
  """q [b, kv, g, T, d] (scaled by head_dim ** -0.5), k/v [b, kv, S, d] (T, S multiples of the
  chunks), q_pos [b, T]. Returns out [b, kv, g, T, d] and the rows' log-sum-exp [b, kv, g, T]
  (float32)."""
  q_chunk, kv_chunk = chunks

  def query_block(index):
    q_block, pos = _block(q, index, q_chunk, 3), _block(q_pos, index, q_chunk, 1)

    def kv_step(j, carry):
      out, row_max, row_sum = carry
      logits = _block_logits(q_block, _block(k, j, kv_chunk, 2), pos, j * kv_chunk)
      new_max = jnp.maximum(row_max, jnp.max(logits, axis=-1))
      correction = jnp.exp(row_max - new_max)
      probs = jnp.exp(logits - new_max[..., None])
      row_sum = row_sum * correction + jnp.sum(probs, axis=-1)
      out = out * correction[..., None] + jnp.einsum(
          'bkgqs,bksd->bkgqd', probs.astype(v.dtype), _block(v, j, kv_chunk, 2),
          preferred_element_type=jnp.float32)
      return out, new_max, row_sum

    shape = q_block.shape[:-1]
    init = (jnp.zeros(q_block.shape, jnp.float32), jnp.full(shape, _MASKED, jnp.float32),
            jnp.zeros(shape, jnp.float32))
    # Causal skip: key blocks after the block's last query position hold nothing it may see.
    needed = jnp.minimum(jnp.max(pos) // kv_chunk + 1, k.shape[2] // kv_chunk)
    out, row_max, row_sum = jax.lax.fori_loop(0, needed, kv_step, init)
    return (out / row_sum[..., None]).astype(q.dtype), row_max + jnp.log(row_sum)

  out, lse = jax.lax.map(query_block, jnp.arange(q.shape[3] // q_chunk))
  # map stacks the blocks first: [n, b, kv, g, chunk, ...] -> [b, kv, g, n * chunk, ...].
  return (jnp.moveaxis(out, 0, 3).reshape(q.shape),
          jnp.moveaxis(lse, 0, 3).reshape(q.shape[:-1]))


def _chunked_backward(q, k, v, q_pos, out, lse, d_out, chunks):
  """(dq, dk, dv), recomputing each block's probabilities from lse: one pass over key blocks,
  each visiting only the query blocks that can see it."""
  q_chunk, kv_chunk = chunks
  num_q_blocks = q.shape[3] // q_chunk
  delta = jnp.sum(d_out.astype(jnp.float32) * out.astype(jnp.float32), axis=-1)
  last_position = jnp.max(q_pos.reshape(q_pos.shape[0], num_q_blocks, q_chunk), axis=(0, 2))

  def kv_block(dq, j):
    k_block, v_block = _block(k, j, kv_chunk, 2), _block(v, j, kv_chunk, 2)

    def q_step(i, carry):
      dq, dk, dv = carry
      q_block, pos = _block(q, i, q_chunk, 3), _block(q_pos, i, q_chunk, 1)
      d_out_block = _block(d_out, i, q_chunk, 3)
      logits = _block_logits(q_block, k_block, pos, j * kv_chunk)
      probs = jnp.exp(logits - _block(lse, i, q_chunk, 3)[..., None])
      dv = dv + jnp.einsum('bkgqs,bkgqd->bksd', probs.astype(d_out.dtype), d_out_block,
                           preferred_element_type=jnp.float32)
      d_probs = jnp.einsum('bkgqd,bksd->bkgqs', d_out_block, v_block,
                           preferred_element_type=jnp.float32)
      d_logits = (probs * (d_probs - _block(delta, i, q_chunk, 3)[..., None])).astype(q.dtype)
      dk = dk + jnp.einsum('bkgqs,bkgqd->bksd', d_logits, q_block,
                           preferred_element_type=jnp.float32)
      dq_block = _block(dq, i, q_chunk, 3) + jnp.einsum(
          'bkgqs,bksd->bkgqd', d_logits, k_block, preferred_element_type=jnp.float32)
      return jax.lax.dynamic_update_slice_in_dim(dq, dq_block, i * q_chunk, 3), dk, dv

    # Query blocks that end before this key block starts see none of it (causal).
    first = jnp.sum(last_position < j * kv_chunk)
    zeros = jnp.zeros(k_block.shape, jnp.float32)
    dq, dk, dv = jax.lax.fori_loop(first, num_q_blocks, q_step, (dq, zeros, zeros))
    return dq, (dk, dv)

  dq, (dk, dv) = jax.lax.scan(kv_block, jnp.zeros(q.shape, jnp.float32),
                              jnp.arange(k.shape[2] // kv_chunk))
  dk = jnp.moveaxis(dk, 0, 2).reshape(k.shape)
  dv = jnp.moveaxis(dv, 0, 2).reshape(v.shape)
  return dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def _chunked_core(q, k, v, q_pos, chunks):
  return _chunked_forward(q, k, v, q_pos, chunks)[0]


def _chunked_core_fwd(q, k, v, q_pos, chunks):
  out, lse = (checkpoint_name(x, RESIDUALS) for x in _chunked_forward(q, k, v, q_pos, chunks))
  return out, (q, k, v, q_pos, out, lse)


def _chunked_core_bwd(chunks, residuals, d_out):
  return (*_chunked_backward(*residuals, d_out, chunks), None)


_chunked_core.defvjp(_chunked_core_fwd, _chunked_core_bwd)


def chunked_attention(q, k, v, q_offset=None, chunk: int | None = None):
  """The `chunked` implementation (FlashAttention-2's forward and backward in plain JAX)."""
  batch, q_len, heads, head_dim = q.shape
  chunk = chunk or (SHORT_CPU_CHUNK if target_platform() == 'cpu' and q_len < 1024 else CHUNK)
  kv_heads = k.shape[2]
  chunks = (min(chunk, q_len), min(chunk, k.shape[1]))
  # Padded queries (position 0) are cut off; padded keys lie after every real query (masked).
  q_pos = _pad_to(jnp.broadcast_to(_positions(q_len, q_offset), (batch, q_len)), 1, chunks[0])
  # Scaling q once costs a pass over [T, d] rather than one over every block's logits.
  q = _pad_to(_grouped((q * head_dim ** -0.5).astype(q.dtype), kv_heads), 3, chunks[0])
  k = _pad_to(k.transpose(0, 2, 1, 3), 2, chunks[1])
  v = _pad_to(v.transpose(0, 2, 1, 3), 2, chunks[1])
  return _ungrouped(_chunked_core(q, k, v, q_pos, chunks)[:, :, :, :q_len])


# ---- splash: the Pallas TPU kernel -----------------------------------------------------------


def _splash_kernel(heads: int, q_len: int, kv_len: int, interpret: bool):
  from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as kernel
  from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as masks
  # The largest of 512, 256, 128 that divides the length (validated: a multiple of 128).
  block = next(size for size in (4 * SPLASH_BLOCK, 2 * SPLASH_BLOCK, SPLASH_BLOCK)
               if q_len % size == 0)
  sizes = kernel.BlockSizes(block_q=block, block_kv=block, block_kv_compute=block,
                            block_q_dkv=block, block_kv_dkv=block, block_kv_dkv_compute=block,
                            block_q_dq=block, block_kv_dq=block)
  mask = masks.MultiHeadMask([masks.CausalMask((q_len, kv_len)) for _ in range(heads)])
  return kernel.make_splash_mha(mask, block_sizes=sizes, head_shards=1, q_seq_shards=1,
                                interpret=interpret)


def kv_for_head_shards(q, k, v):
  """(k, v) with each query head's copy of its KV head where the mesh splits the query heads
  but not the KV heads (tensor parallelism past the KV heads), so every shard holds the KV
  heads its query heads read; unchanged elsewhere."""
  if splits_evenly('kv_heads', k.shape[2]):
    return k, v
  group = q.shape[2] // k.shape[2]
  return tuple(constrain(jnp.repeat(x, group, axis=2), ('batch', 'length', 'heads', 'head_dim'))
               for x in (k, v))


def _on_shards(local, q, k, v):
  """local(q, k, v) -> out on each device's batch and head shard (shard_map over the current
  mesh), or on the whole arrays without one."""
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty:
    return local(q, k, v)
  k, v = kv_for_head_shards(q, k, v)
  q_spec = logical_to_spec(('batch', 'length', 'heads', 'head_dim'))
  kv_spec = logical_to_spec(('batch', 'length', 'kv_heads', 'head_dim'), k.shape)
  return jax.shard_map(local, in_specs=(q_spec, kv_spec, kv_spec), out_specs=q_spec,
                       check_vma=False)(q, k, v)


def splash_attention(q, k, v, q_offset=None):
  """The `splash` implementation: the kernel on each device's batch and head shard."""
  assert q_offset is None, 'a KV cache resolves to a cache implementation'
  interpret = target_platform() != 'tpu'
  head_dim = q.shape[-1]

  def local(q, k, v):
    # The kernel reads [heads, length, head_dim] per sequence and does not scale the logits.
    kernel = _splash_kernel(q.shape[2], q.shape[1], k.shape[1], interpret)
    q = (q * head_dim ** -0.5).astype(q.dtype).transpose(0, 2, 1, 3)
    out = jax.vmap(kernel)(q, k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3))
    return out.transpose(0, 2, 1, 3)

  return _on_shards(local, q, k, v)


# ---- cpu_flash: the compiled CPU kernel ------------------------------------------------------


@jax.custom_vjp
def _cpu_flash(q, k, v):
  return _cpu_flash_fwd(q, k, v)[0]


def _cpu_flash_fwd(q, k, v):
  batch, length, heads, _ = q.shape
  out, lse = jax.ffi.ffi_call(cpu_kernel.FORWARD, (
      jax.ShapeDtypeStruct(q.shape, jnp.float32),
      jax.ShapeDtypeStruct((batch, heads, length), jnp.float32)), vmap_method='sequential')(
          q, k, v)
  out, lse = checkpoint_name(out, RESIDUALS), checkpoint_name(lse, RESIDUALS)
  return out, (q, k, v, out, lse)


def _cpu_flash_bwd(residuals, d_out):
  shapes = tuple(jax.ShapeDtypeStruct(x.shape, jnp.float32) for x in residuals[:3])
  return tuple(jax.ffi.ffi_call(cpu_kernel.BACKWARD, shapes, vmap_method='sequential')(
      *residuals, d_out))


_cpu_flash.defvjp(_cpu_flash_fwd, _cpu_flash_bwd)


def cpu_flash_attention(q, k, v, q_offset=None):
  """The `cpu_flash` implementation: the compiled kernel on each device's batch and head shard
  (float32; the kernel is built and registered by `resolve`)."""
  assert q_offset is None, 'a KV cache resolves to a cache implementation'
  batch, length, heads, head_dim = q.shape
  if (k.shape != v.shape or k.shape[:2] != (batch, length) or k.shape[3] != head_dim
      or heads % k.shape[2] or {x.dtype for x in (q, k, v)} != {jnp.dtype(jnp.float32)}):
    raise ValueError(f'cpu_flash is causal self-attention in float32: q [batch, length, heads, '
                     f'head_dim], k and v [batch, length, kv_heads, head_dim], kv_heads dividing '
                     f'heads; got q {q.shape} {q.dtype}, k {k.shape} {k.dtype}, v {v.shape} '
                     f'{v.dtype}.')
  return _on_shards(_cpu_flash, q, k, v)


_IMPLEMENTATIONS = {
    'xla': lambda q, k, v, q_offset: softmax_attention(q, k, v, q_offset)[0],
    'dot_product': _dot_product(None),
    'cudnn': _dot_product('cudnn'),
    'chunked': chunked_attention,
    'splash': splash_attention,
    'cpu_flash': cpu_flash_attention,
}
