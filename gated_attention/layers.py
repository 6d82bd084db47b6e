"""Building blocks of the decoder: parameters with logical axes, RMSNorm, RoPE and SwiGLU.
Scaled dot-product attention lives in `gated_attention.attention`."""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from gated_attention.sharding import LogicalAxes, constrain


def param(rngs: nnx.Rngs, shape, logical_axes: LogicalAxes, dtype, std: float) -> nnx.Param:
  """A normal(0, std) parameter of `dtype`, tagged with its logical axis names (zeros when std
  is 0)."""
  assert len(shape) == len(logical_axes), (shape, logical_axes)
  # float(std): a NumPy float64 std would promote a 16-bit draw to float32.
  value = (jnp.zeros(shape, dtype) if std == 0 else
           float(std) * jax.random.normal(rngs.params(), shape, dtype))
  return nnx.Param(value, logical_axes=tuple(logical_axes))


def dense(x: jax.Array, kernel: jax.Array, contract: int = 1,
          preferred_element_type=None) -> jax.Array:
  """x [..., *kernel.shape[:contract]] times kernel -> [..., *kernel.shape[contract:]], as one
  2-D matrix product over x's flattened leading dims (the same dot on TPU and GPU; XLA:CPU runs
  a 2-D product's gradient much faster than that of the batched einsum)."""
  features_in = math.prod(kernel.shape[:contract])
  out = jnp.dot(x.reshape(-1, features_in), kernel.reshape(features_in, -1),
                preferred_element_type=preferred_element_type)
  return out.reshape(*x.shape[:x.ndim - contract], *kernel.shape[contract:])


def _inverse_rms(x32: jax.Array, eps: float) -> jax.Array:
  """1 / rms over the last axis; NaN where the mean square overflows float32 (|x| past about
  1.8e19, a diverged model), which would otherwise normalise the row to zeros, silently."""
  mean_square = jnp.mean(x32 * x32, axis=-1, keepdims=True)
  return jnp.where(jnp.isinf(mean_square), jnp.nan, jax.lax.rsqrt(mean_square + eps))


def rms_norm(x: jax.Array, eps: float) -> jax.Array:
  """Parameter-free RMSNorm over the last axis, computed in float32, returned in x's dtype."""
  x32 = x.astype(jnp.float32)
  return (x32 * _inverse_rms(x32, eps)).astype(x.dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def scaled_rms_norm(x: jax.Array, scale: jax.Array, eps: float) -> jax.Array:
  """rms_norm(x) * scale (float32 [dim]), returned in x's dtype (the normalised x is rounded to
  x's dtype before the scale, as Hugging Face's Qwen3 norms do).

  Its gradient is the closed form dx = r (g s - x_hat mean(g s x_hat)), ds = sum(g x_hat), with
  r = 1 / rms(x) kept from the forward pass: two fused passes over x, where autodiff of the
  forward formula costs XLA:CPU several. The row term mean(g s x_hat) is taken as the product
  (g x_hat) @ s / dim: written as an elementwise product and a sum, XLA:CPU hands it to a
  library reduction that needs s broadcast out to x's full shape in memory first (XLA:TPU
  compiles both forms to the same program)."""
  return _scaled_rms_norm_forward(x, scale, eps)[0]


def _scaled_rms_norm_forward(x, scale, eps):
  x32 = x.astype(jnp.float32)
  inverse_rms = _inverse_rms(x32, eps)
  normed = (x32 * inverse_rms).astype(x.dtype).astype(jnp.float32)
  return (normed * scale).astype(x.dtype), (x, inverse_rms, scale)


def _scaled_rms_norm_backward(eps, residuals, d_out):
  del eps
  x, inverse_rms, scale = residuals
  x_hat = x.astype(jnp.float32) * inverse_rms
  d_out = d_out.astype(jnp.float32)
  d_x_hat = d_out * x_hat
  row = jnp.einsum('...d,d->...', d_x_hat, scale, precision=jax.lax.Precision.HIGHEST)
  d_x = inverse_rms * (d_out * scale - x_hat * (row / x.shape[-1])[..., None])
  d_scale = jnp.sum(d_x_hat, axis=tuple(range(x.ndim - 1)))
  return d_x.astype(x.dtype), d_scale.astype(scale.dtype)


scaled_rms_norm.defvjp(_scaled_rms_norm_forward, _scaled_rms_norm_backward)


class RMSNorm(nnx.Module):
  """RMSNorm with a learned scale w (or 1 + w, w initialised to 0, when `plus_one`)."""

  def __init__(self, dim: int, logical_axis: str | None, *, eps: float, plus_one: bool,
               param_dtype, rngs: nnx.Rngs):
    self.eps, self.plus_one = eps, plus_one
    init = jnp.zeros if plus_one else jnp.ones
    self.scale = nnx.Param(init((dim,), param_dtype), logical_axes=(logical_axis,))

  def __call__(self, x: jax.Array) -> jax.Array:
    scale = self.scale[...].astype(jnp.float32)
    return scaled_rms_norm(x, 1.0 + scale if self.plus_one else scale, self.eps)


def _yarn_frequencies(inv_freq: np.ndarray, rotary_dim: int, theta: float, scaling):
  """YaRN (Peng et al. 2023, arXiv 2309.00071): dimensions that rotate fewer than beta_slow
  times over the original context are interpolated (divided by factor), those rotating more than
  beta_fast times are kept, with a linear ramp between; logits are tempered by the attention
  factor 0.1 ln(factor) + 1 (or mscale's ratio, or the value given)."""
  def correction_dim(rotations):  # The dimension that turns `rotations` times over the context.
    return (rotary_dim * math.log(scaling.original_max_position / (rotations * 2 * math.pi))
            / (2 * math.log(theta)))
  low, high = correction_dim(scaling.beta_fast), correction_dim(scaling.beta_slow)
  if scaling.truncate:
    low, high = math.floor(low), math.ceil(high)
  low, high = max(low, 0), min(high, rotary_dim - 1)
  ramp = np.clip((np.arange(rotary_dim // 2, dtype=np.float32) - low)
                 / (high - low if high != low else 0.001), 0, 1)
  inv_freq = (inv_freq / scaling.factor) * ramp + inv_freq * (1 - ramp)

  attention_factor = scaling.attention_factor
  if not attention_factor:
    def temperature(mscale: float) -> float:  # YaRN's sqrt(1 / t) = 0.1 mscale ln(s) + 1.
      return 0.1 * mscale * math.log(scaling.factor) + 1.0 if scaling.factor > 1 else 1.0
    attention_factor = (temperature(scaling.mscale) / temperature(scaling.mscale_all_dim)
                        if scaling.mscale and scaling.mscale_all_dim else temperature(1.0))
  return inv_freq.astype(np.float32), float(attention_factor)


# model.rope_scaling.type -> (inverse frequencies, rotary dim, theta, scaling) -> (inverse
# frequencies, attention factor that multiplies sin and cos).
ROPE_SCALINGS = {
    'none': lambda inv_freq, rotary_dim, theta, scaling: (inv_freq, 1.0),
    'linear': lambda inv_freq, rotary_dim, theta, scaling: (inv_freq / np.float32(
        scaling.factor), 1.0),
    'yarn': _yarn_frequencies,
}


def rope_frequencies(rotary_dim: int, theta: float, scaling) -> tuple[np.ndarray, float]:
  """(inverse frequencies [rotary_dim // 2] float32, attention factor) for the RoPE scaling
  `scaling` (config.model.rope_scaling; its `type` picks the entry of ROPE_SCALINGS)."""
  inv_freq = (1.0 / theta ** (np.arange(0, rotary_dim, 2, dtype=np.float32) / rotary_dim))
  return ROPE_SCALINGS[scaling.type](inv_freq.astype(np.float32), rotary_dim, theta, scaling)


def rope_tables(positions: jax.Array | np.ndarray, inv_freq: np.ndarray,
                attention_factor: float = 1.0):
  """sin and cos of shape [batch or 1, length, rotary_dim // 2] for rotate-half RoPE at
  positions [batch or 1, length], scaled by the attention factor (YaRN), in float32.

  Positions known when tracing (a NumPy array) give NumPy tables, which enter a compiled program
  as constants. Computed inside the program, XLA fuses the sine and cosine into each of their
  consumers (every layer's rotation of q and k, forward and backward) and evaluates them there
  for every element, once per head and sequence."""
  xp = np if isinstance(positions, np.ndarray) else jnp
  angles = positions.astype(np.float32)[..., None] * np.asarray(inv_freq, np.float32)
  factor = np.float32(attention_factor)
  return xp.sin(angles) * factor, xp.cos(angles) * factor


def _rotate(x: jax.Array, sin: jax.Array, cos: jax.Array) -> jax.Array:
  half = sin.shape[-1]
  x32 = x.astype(jnp.float32)
  x1, x2, rest = x32[..., :half], x32[..., half:2 * half], x32[..., 2 * half:]
  sin, cos = sin[:, :, None, :], cos[:, :, None, :]
  rotated = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin, rest], axis=-1)
  return rotated.astype(x.dtype)


@jax.custom_vjp
def apply_rope(x: jax.Array, sin: jax.Array, cos: jax.Array) -> jax.Array:
  """Rotate-half RoPE on the first 2 * sin.shape[-1] dims of x [batch, length, heads, head_dim]
  (sin, cos from rope_tables); the remaining dims pass through (partial rotary).

  Its gradient is the inverse rotation of the output's gradient (the rotation's transpose; a
  YaRN factor in sin and cos scales both ways alike): one fused pass, where the gradient of the
  slices and concatenation costs XLA:CPU pads and adds. sin and cos are functions of positions
  and get no gradient."""
  return _rotate(x, sin, cos)


def _apply_rope_forward(x, sin, cos):
  return _rotate(x, sin, cos), (sin, cos)


def _apply_rope_backward(residuals, d_out):
  sin, cos = residuals
  return _rotate(d_out, -sin, cos), jnp.zeros_like(sin), jnp.zeros_like(cos)


apply_rope.defvjp(_apply_rope_forward, _apply_rope_backward)


class SwiGLU(nnx.Module):
  """down(silu(x W_gate) * (x W_up)), with W_gate and W_up in one [embed, 2, mlp] kernel;
  `fused`: both from one matrix product (see model.fused_projections in gated_attention.config)."""

  def __init__(self, d_model: int, mlp_dim: int, *, std: float, out_std: float, param_dtype,
               fused: bool, rngs: nnx.Rngs):
    self.wi = param(rngs, (d_model, 2, mlp_dim), ('embed', None, 'mlp'), param_dtype, std)
    self.wo = param(rngs, (mlp_dim, d_model), ('mlp', 'embed'), param_dtype, out_std)
    self.fused = fused

  def __call__(self, x: jax.Array) -> jax.Array:
    wi = self.wi[...].astype(x.dtype)
    if self.fused:  # The kernel keeps its shape: a tensor axis splits `mlp` in both halves.
      h = jnp.einsum('...e,ekm->...km', x, wi)
      gate, up = h[..., 0, :], h[..., 1, :]
    else:  # Two products from the kernel's halves: XLA:CPU runs them faster (no activation copies).
      gate, up = dense(x, wi[:, 0]), dense(x, wi[:, 1])
    h = constrain(jax.nn.silu(gate) * up, ('batch', 'length', 'mlp'))
    return dense(h, self.wo[...].astype(x.dtype))
