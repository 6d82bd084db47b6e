"""Building blocks of the decoder: parameters with logical axes, RMSNorm, RoPE and SwiGLU.
Scaled dot-product attention lives in `gated_attention.attention`."""

import jax
import jax.numpy as jnp
from flax import nnx

from gated_attention.sharding import LogicalAxes, constrain


def param(rngs: nnx.Rngs, shape, logical_axes: LogicalAxes, dtype, std: float) -> nnx.Param:
  """A normal(0, std) parameter tagged with its logical axis names (zeros when std is 0)."""
  assert len(shape) == len(logical_axes), (shape, logical_axes)
  value = (jnp.zeros(shape, dtype) if std == 0 else
           std * jax.random.normal(rngs.params(), shape, dtype))
  return nnx.Param(value, logical_axes=tuple(logical_axes))


def rms_norm(x: jax.Array, eps: float) -> jax.Array:
  """Parameter-free RMSNorm over the last axis, computed in float32, returned in x's dtype."""
  x32 = x.astype(jnp.float32)
  return (x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)).astype(x.dtype)


class RMSNorm(nnx.Module):
  """RMSNorm with a learned scale w (or 1 + w, w initialised to 0, when `plus_one`)."""

  def __init__(self, dim: int, logical_axis: str | None, *, eps: float, plus_one: bool,
               param_dtype, rngs: nnx.Rngs):
    self.eps, self.plus_one = eps, plus_one
    init = jnp.zeros if plus_one else jnp.ones
    self.scale = nnx.Param(init((dim,), param_dtype), logical_axes=(logical_axis,))

  def __call__(self, x: jax.Array) -> jax.Array:
    scale = self.scale[...].astype(jnp.float32)
    scale = 1.0 + scale if self.plus_one else scale
    return (rms_norm(x, self.eps).astype(jnp.float32) * scale).astype(x.dtype)


def rope_tables(positions: jax.Array, rotary_dim: int, theta: float):
  """sin and cos of shape [batch or 1, length, rotary_dim // 2] for rotate-half RoPE at
  positions [batch or 1, length]."""
  inv_freq = theta ** (-jnp.arange(0, rotary_dim, 2, dtype=jnp.float32) / rotary_dim)
  angles = positions.astype(jnp.float32)[..., None] * inv_freq
  return jnp.sin(angles), jnp.cos(angles)


def apply_rope(x: jax.Array, sin: jax.Array, cos: jax.Array) -> jax.Array:
  """Rotate-half RoPE on the first 2 * sin.shape[-1] dims of x [batch, length, heads, head_dim]
  (sin, cos from rope_tables); the remaining dims pass through (partial rotary)."""
  half = sin.shape[-1]
  x32 = x.astype(jnp.float32)
  x1, x2, rest = x32[..., :half], x32[..., half:2 * half], x32[..., 2 * half:]
  sin, cos = sin[:, :, None, :], cos[:, :, None, :]
  rotated = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin, rest], axis=-1)
  return rotated.astype(x.dtype)


class SwiGLU(nnx.Module):
  """down(silu(x W_gate) * (x W_up)), with W_gate and W_up fused into one [embed, 2, mlp] kernel."""

  def __init__(self, d_model: int, mlp_dim: int, *, std: float, out_std: float, param_dtype,
               rngs: nnx.Rngs):
    self.wi = param(rngs, (d_model, 2, mlp_dim), ('embed', None, 'mlp'), param_dtype, std)
    self.wo = param(rngs, (mlp_dim, d_model), ('mlp', 'embed'), param_dtype, out_std)

  def __call__(self, x: jax.Array) -> jax.Array:
    h = jnp.einsum('bte,ecm->btcm', x, self.wi[...].astype(x.dtype))
    h = constrain(jax.nn.silu(h[:, :, 0]) * h[:, :, 1], ('batch', 'length', 'mlp'))
    return jnp.einsum('btm,me->bte', h, self.wo[...].astype(x.dtype))
