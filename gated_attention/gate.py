"""The gate of gated attention (Qiu et al. 2025, arXiv 2505.06708).

    Y' = Y * act(X W_theta)     (mode='multiplicative', the default)
    Y' = Y + act(X W_theta)     (mode='additive')

X is the attention block's normed input (what the q/k/v projections read); W_theta is a
bias-free linear map from d_model. Every axis the paper studies is a key of
`config.model.gate`:

  position      Y, the tensor being gated:
                  G1 'sdpa'  - each head's SDPA output, before concatenation and W_o (recommended)
                  G2 'value' - the value projection's output (a gate per KV head and key token)
                  G3 'key'   - the key projection's output
                  G4 'query' - the query projection's output
                  G5 'dense' - the output projection W_o's output (d_model wide)
                'none' turns the gate off; 'g1'..'g5' are accepted as aliases.
  granularity   'elementwise' (a score per head and dim) or 'headwise' (one score per head).
  head_shared   False: each head has its own W_theta. True: the projection keeps the
                head-specific size but its pre-activation scores are averaged over heads
                (query heads for G1/G4, KV heads for G2/G3), so all heads get the same gate.
  mode          'multiplicative' or 'additive'.
  activation    'sigmoid', 'silu', 'identity', or 'ns_sigmoid' = 0.5 + 0.5 * sigmoid
                (range [0.5, 1]: non-linear but not sparse).
  input_dependent  False gives the input-independent gate: a learnable score per head and dim,
                initialised to zero, with no X.
  sdpa_nonlinearity  The paper's parameter-free analysis variants at the SDPA output, applied
                before any G1 gate: 'rms_norm' (per-head RMSNorm, "group norm") or 'silu'.

For G1..G4 the gate projection is fused with the projection of the same heads into one matmul:
the query (G1, G4), key (G3) or value (G2) kernel gets `width` extra output columns per head, so
a flattened row reads [h0 tensor | h0 gate | h1 tensor | h1 gate | ...] as in Qwen3-Next.
Added parameters per layer are d_model x (heads x head_dim), (heads), or d_model for G5.
"""

import jax
import jax.numpy as jnp
from flax import nnx

from gated_attention.config import canonical_gate_position
from gated_attention.layers import dense, param, rms_norm

_ACTIVATIONS = {
    'sigmoid': jax.nn.sigmoid,
    'silu': jax.nn.silu,
    'identity': lambda x: x,
    'ns_sigmoid': lambda x: 0.5 + 0.5 * jax.nn.sigmoid(x),
}


def sdpa_nonlinearity(y: jax.Array, kind: str, eps: float) -> jax.Array:
  """The paper's parameter-free alternatives to a gate on the SDPA output y [..., head_dim]."""
  if kind == 'rms_norm':
    return rms_norm(y, eps)
  if kind == 'silu':
    return jax.nn.silu(y)
  return y


def gate_params_per_layer(model_config) -> int:
  """Parameters one layer's gate adds: d_model x width for an input-dependent gate (PAPER.md's
  table), the score vector alone for an input-independent one."""
  gate = model_config.gate
  position = canonical_gate_position(gate.position)
  if position == 'none':
    return 0
  if position == 'dense':
    width = model_config.d_model
  else:
    heads = (model_config.num_kv_heads if position in ('key', 'value')
             else model_config.num_heads)
    width = heads * (model_config.head_dim if gate.granularity == 'elementwise' else 1)
  return width * (model_config.d_model if gate.input_dependent else 1)


class Gate(nnx.Module):
  """One gate of an attention block; a no-op when position is 'none'."""

  def __init__(self, model_config, *, rngs: nnx.Rngs):
    gate = model_config.gate
    self.position = canonical_gate_position(gate.position)
    self.head_shared = gate.head_shared
    self.mode = gate.mode
    self.activation = gate.activation
    self.input_dependent = gate.input_dependent
    if self.position == 'dense':
      self.width = model_config.d_model
      score_shape, score_axes = (self.width,), ('embed',)
    else:
      kv_position = self.position in ('key', 'value')
      heads = model_config.num_kv_heads if kv_position else model_config.num_heads
      self.width = model_config.head_dim if gate.granularity == 'elementwise' else 1
      score_shape, score_axes = (heads, self.width), ('kv_heads' if kv_position else 'heads',
                                                      'head_dim')
    param_dtype = jnp.dtype(model_config.param_dtype)
    if self.position != 'none' and not self.input_dependent:
      self.score = param(rngs, score_shape, score_axes, param_dtype, std=0.0)
    elif self.position == 'dense':
      self.kernel = param(rngs, (model_config.d_model, self.width), ('embed', 'embed'),
                          param_dtype, model_config.init_std)

  @property
  def enabled(self) -> bool:
    return self.position != 'none'

  @property
  def fused_into(self) -> str | None:
    """The projection ('query', 'key', 'value') that carries this gate's W_theta, if any."""
    if not self.enabled or not self.input_dependent or self.position == 'dense':
      return None
    return 'query' if self.position == 'sdpa' else self.position

  def split(self, fused: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Splits the last axis of a fused kernel [embed, heads, head_dim + width], or of its
    product [..., heads, head_dim + width], into (the projection's part, W_theta's part)."""
    return fused[..., :-self.width], fused[..., -self.width:]

  def logits(self, x: jax.Array) -> jax.Array:
    """Gate logits of an unfused gate (G5, or input-independent) from X [batch, length, embed]."""
    if not self.input_dependent:
      return self.score[...].astype(x.dtype)
    return dense(x, self.kernel[...].astype(x.dtype))

  def __call__(self, y: jax.Array, logits: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Gates y with act(logits); returns (gated y, the gate score applied to each element of y)."""
    if self.head_shared:
      logits = jnp.mean(logits, axis=-2, keepdims=True)
    score = _ACTIVATIONS[self.activation](logits)
    gated = y * score if self.mode == 'multiplicative' else y + score
    return gated, jnp.broadcast_to(score, gated.shape)  # Free in training: nothing reads it.
