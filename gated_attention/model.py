"""Decoder-only language model with gated attention: embedding, pre-norm blocks (attention with
its gate, SwiGLU MLP), final RMSNorm, logits.

`Transformer(config.model, rngs=...)(tokens)` returns float32 logits. With `analysis=True` it also
returns the per-layer measurements the paper reports (see `Transformer.__call__`); the training
path never computes them.
"""

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from gated_attention.gate import Gate, gate_params_per_layer, sdpa_nonlinearity
from gated_attention.layers import (RMSNorm, SwiGLU, apply_rope, causal_attention, param,
                                    rope_tables)
from gated_attention.moe import MoE
from gated_attention.sharding import constrain

GATE_HISTOGRAM_BINS = 40
ACTIVATION_AXES = ('batch', 'length', 'embed')


def gate_histogram_edges(activation: str) -> np.ndarray:
  """Fixed bin edges for gate-score histograms; values outside fall into the end bins."""
  low, high = {'sigmoid': (0.0, 1.0), 'ns_sigmoid': (0.0, 1.0), 'silu': (-0.5, 3.0),
               'identity': (-3.0, 3.0)}[activation]
  return np.linspace(low, high, GATE_HISTOGRAM_BINS + 1, dtype=np.float32)


def resolve_attention_impl(impl: str) -> str:
  """'auto' is jax.nn.dot_product_attention (cuDNN flash) on GPU and explicit softmax elsewhere."""
  if impl == 'auto':
    return 'dot_product' if jax.default_backend() == 'gpu' else 'xla'
  return impl


class Attention(nnx.Module):
  """Causal GQA self-attention with QK-norm, (partial) RoPE and the configured gate."""

  def __init__(self, cfg, *, rngs: nnx.Rngs):
    d, e = cfg.head_dim, cfg.d_model
    dtype = jnp.dtype(cfg.param_dtype)
    self.gate = Gate(cfg, rngs=rngs)
    extra = {name: self.gate.width if self.gate.fused_into == name else 0
             for name in ('query', 'key', 'value')}
    self.wq = param(rngs, (e, cfg.num_heads, d + extra['query']), ('embed', 'heads', 'head_dim'),
                    dtype, cfg.init_std)
    self.wk = param(rngs, (e, cfg.num_kv_heads, d + extra['key']),
                    ('embed', 'kv_heads', 'head_dim'), dtype, cfg.init_std)
    self.wv = param(rngs, (e, cfg.num_kv_heads, d + extra['value']),
                    ('embed', 'kv_heads', 'head_dim'), dtype, cfg.init_std)
    self.wo = param(rngs, (cfg.num_heads, d, e), ('heads', 'head_dim', 'embed'), dtype,
                    cfg.init_std / np.sqrt(2 * cfg.num_layers))
    norm = dict(eps=cfg.norm_eps, plus_one=cfg.norm_plus_one, param_dtype=dtype, rngs=rngs)
    self.q_norm = RMSNorm(d, 'head_dim', **norm) if cfg.qk_norm else None
    self.k_norm = RMSNorm(d, 'head_dim', **norm) if cfg.qk_norm else None
    self.impl = resolve_attention_impl(cfg.attention_impl)
    self.sdpa_nonlinearity = cfg.gate.sdpa_nonlinearity
    self.eps = cfg.norm_eps

  def __call__(self, x: jax.Array, sin: jax.Array, cos: jax.Array, analysis: bool = False):
    """x: normed block input [batch, length, embed]. Returns ([batch, length, embed], stats)."""
    projections = {
        'query': jnp.einsum('bte,ehd->bthd', x, self.wq[...].astype(x.dtype)),
        'key': jnp.einsum('bte,ehd->bthd', x, self.wk[...].astype(x.dtype)),
        'value': jnp.einsum('bte,ehd->bthd', x, self.wv[...].astype(x.dtype)),
    }
    gate, logits, score = self.gate, None, None
    if gate.fused_into:
      projections[gate.fused_into], logits = gate.split(projections[gate.fused_into])
    elif gate.enabled:
      logits = gate.logits(x)
    if gate.position in projections:  # G2, G3, G4 gate a projection's output directly.
      projections[gate.position], score = gate(projections[gate.position], logits)

    q = constrain(projections['query'], ('batch', 'length', 'heads', 'head_dim'))
    k = constrain(projections['key'], ('batch', 'length', 'kv_heads', 'head_dim'))
    v = constrain(projections['value'], ('batch', 'length', 'kv_heads', 'head_dim'))
    if self.q_norm is not None:
      q, k = self.q_norm(q), self.k_norm(k)
    q, k = apply_rope(q, sin, cos), apply_rope(k, sin, cos)

    y, probs = causal_attention(q, k, v, 'xla' if analysis else self.impl, return_probs=analysis)
    y = sdpa_nonlinearity(y, self.sdpa_nonlinearity, self.eps)
    if gate.position == 'sdpa':
      y, score = gate(y, logits)
    out = jnp.einsum('bthd,hde->bte', y, self.wo[...].astype(x.dtype))
    if gate.position == 'dense':
      out, score = gate(out, logits)

    stats = {}
    if analysis:
      # Queries 1.. only: query 0 can attend to nothing but the first token.
      stats['first_token_attention'] = jnp.mean(probs[:, :, 1:, 0], axis=(0, 2))
      if score is not None:
        score = score.astype(jnp.float32)
        edges = gate_histogram_edges(gate.activation)
        stats['gate_score_mean'] = jnp.mean(score)
        stats['gate_score_histogram'] = jnp.histogram(jnp.clip(score, edges[0], edges[-1]),
                                                      bins=edges)[0]
    return constrain(out, ACTIVATION_AXES), stats


def mlp_width(cfg) -> int:
  """The dense MLP width: mlp_dim, narrowed when match_baseline_params so that the gate's added
  parameters are taken out of the MLP (SwiGLU holds 3 * d_model parameters per unit of width)."""
  if not cfg.match_baseline_params:
    return cfg.mlp_dim
  return cfg.mlp_dim - round(gate_params_per_layer(cfg) / (3 * cfg.d_model))


class Block(nnx.Module):
  """Pre-norm decoder block: x + attention(norm(x)), then x + mlp(norm(x)) (dense or MoE)."""

  def __init__(self, cfg, *, rngs: nnx.Rngs):
    dtype = jnp.dtype(cfg.param_dtype)
    norm = dict(eps=cfg.norm_eps, plus_one=cfg.norm_plus_one, param_dtype=dtype, rngs=rngs)
    self.attention_norm = RMSNorm(cfg.d_model, 'embed', **norm)
    self.attention = Attention(cfg, rngs=rngs)
    self.sandwich_norm = RMSNorm(cfg.d_model, 'embed', **norm) if cfg.sandwich_norm else None
    self.mlp_norm = RMSNorm(cfg.d_model, 'embed', **norm)
    out_std = cfg.init_std / np.sqrt(2 * cfg.num_layers)
    if cfg.moe.num_experts:
      self.mlp = MoE(cfg, std=cfg.init_std, out_std=out_std, param_dtype=dtype, rngs=rngs)
    else:
      self.mlp = SwiGLU(cfg.d_model, mlp_width(cfg), std=cfg.init_std, out_std=out_std,
                        param_dtype=dtype, rngs=rngs)

  def __call__(self, x, sin, cos, analysis: bool = False):
    attended, stats = self.attention(self.attention_norm(x), sin, cos, analysis)
    if self.sandwich_norm is not None:
      attended = self.sandwich_norm(attended)
    x = x + attended
    x = constrain(x + self.mlp(self.mlp_norm(x)), ACTIVATION_AXES)
    if analysis:
      stats['max_activation'] = jnp.max(jnp.abs(x.astype(jnp.float32)))
    return x, stats


class Transformer(nnx.Module):
  """The language model. Parameters in `param_dtype`, computation in `dtype`."""

  def __init__(self, cfg, *, rngs: nnx.Rngs):
    self.dtype = jnp.dtype(cfg.dtype)
    param_dtype = jnp.dtype(cfg.param_dtype)
    self.embedding = param(rngs, (cfg.vocab_size, cfg.d_model), ('vocab', 'embed'), param_dtype,
                           cfg.init_std)
    self.blocks = nnx.List([Block(cfg, rngs=rngs) for _ in range(cfg.num_layers)])
    self.final_norm = RMSNorm(cfg.d_model, 'embed', eps=cfg.norm_eps,
                              plus_one=cfg.norm_plus_one, param_dtype=param_dtype, rngs=rngs)
    self.lm_head = None if cfg.tie_embeddings else param(
        rngs, (cfg.d_model, cfg.vocab_size), ('embed', 'vocab'), param_dtype, cfg.init_std)
    self.rotary_dim = int(cfg.head_dim * cfg.rope_fraction)
    self.rope_theta = cfg.rope_theta
    self.remat = cfg.remat

  def __call__(self, tokens: jax.Array, analysis: bool = False):
    """tokens: int [batch, length]. Returns float32 logits [batch, length, vocab].

    With analysis=True returns (logits, stats), stats holding per-layer arrays:
      first_token_attention [layers, heads]: mean attention probability on token 0 (queries 1..);
      max_activation [layers]: max |hidden state| of the residual stream after each layer;
      gate_score_mean [layers], gate_score_histogram [layers, bins] (gated models only).
    """
    x = jnp.take(self.embedding[...], tokens, axis=0).astype(self.dtype)
    x = constrain(x, ACTIVATION_AXES)
    sin, cos = rope_tables(jnp.arange(tokens.shape[1]), self.rotary_dim, self.rope_theta)
    per_layer = []
    for block in self.blocks:
      if self.remat and not analysis:  # Keep only each block's input for the backward pass.
        x, stats = nnx.remat(Block.__call__, static_argnums=(4,))(block, x, sin, cos, False)
      else:
        x, stats = block(x, sin, cos, analysis)
      per_layer.append(stats)
    x = self.final_norm(x)
    if self.lm_head is None:
      logits = jnp.einsum('bte,ve->btv', x, self.embedding[...].astype(self.dtype),
                          preferred_element_type=jnp.float32)
    else:
      logits = jnp.einsum('bte,ev->btv', x, self.lm_head[...].astype(self.dtype),
                          preferred_element_type=jnp.float32)
    logits = constrain(logits, ('batch', 'length', 'vocab'))
    if not analysis:
      return logits
    return logits, {key: jnp.stack([s[key] for s in per_layer]) for key in per_layer[0]}


def apply(graphdef, params, tokens: jax.Array, analysis: bool = False):
  """Runs the model functionally (the one way training and evaluation call it).

  Returns (logits, aux_losses, stats): aux_losses maps each sown auxiliary loss name
  (mixture-of-experts: load_balance_loss, router_z_loss) to its mean over layers; stats are the
  per-layer analysis arrays when analysis=True, else {}.
  """
  model = nnx.merge(graphdef, params)
  out, intermediates = nnx.capture(model, nnx.Intermediate)(tokens, analysis=analysis)
  logits, stats = out if analysis else (out, {})
  sown: dict[str, list] = {}
  for path, variable in nnx.to_flat_state(intermediates):
    sown.setdefault(path[-1], []).extend(variable.get_value())
  aux_losses = {name: jnp.mean(jnp.stack(values)) for name, values in sown.items()}
  return logits, aux_losses, stats
