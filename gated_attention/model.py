"""Decoder-only language model with gated attention: embedding, pre-norm blocks (attention with
its gate, SwiGLU MLP or mixture of experts), final RMSNorm, logits.

`Transformer(config.model, rngs=...)(tokens)` returns a `ModelOutput` whose `logits` are float32;
given the next tokens (`targets=`) it returns their loss instead, computed `model.loss_chunk`
positions at a time (gated_attention/loss.py). The same call serves training, evaluation with the
paper's measurements (`analysis=True`; the training path never computes them) and generation
(`cache=`, a `KVCache`).

Layers are a Python loop over `blocks` or, with `model.scan_layers`, one block whose parameters
are stacked on a leading `layers` axis (`layers`), run under jax.lax.scan: one block body is
compiled whatever the depth. Both layouts run the same block code and convert into each other
(`gated_attention.state.convert_layers`).
"""

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from gated_attention import attention as attention_lib
from gated_attention.gate import Gate, gate_params_per_layer, sdpa_nonlinearity
from gated_attention.layers import (RMSNorm, SwiGLU, apply_rope, dense, param, rope_frequencies,
                                    rope_tables)
from gated_attention.loss import next_token_loss, output_logits
from gated_attention.moe import EXPERT_MATMUL, MoE
from gated_attention.sharding import constrain, splits_evenly

GATE_HISTOGRAM_BINS = 40
ATTENTION_MAP_SIZE = 64  # analysis: attention maps of the first positions, as the paper's Fig. 2.
ACTIVATION_AXES = ('batch', 'length', 'embed')
# What each block keeps for the backward pass (model.remat): everything, only its input
# (recompute the rest), or the outputs of its weight matmuls and of its fused attention kernel
# (recompute the cheap rest: norms, rotary, gate, SwiGLU).
_policies = jax.checkpoint_policies
REMAT_POLICIES = {
    'none': None,
    'full': _policies.nothing_saveable,
    'save_dots': _policies.save_from_both_policies(
        _policies.save_from_both_policies(
            _policies.dots_with_no_batch_dims_saveable,
            _policies.save_only_these_names(EXPERT_MATMUL, attention_lib.RESIDUALS)),
        attention_lib.kernel_outputs_saveable),
}


def gate_histogram_edges(activation: str) -> np.ndarray:
  """Fixed bin edges for gate-score histograms; values outside fall into the end bins."""
  low, high = {'sigmoid': (0.0, 1.0), 'ns_sigmoid': (0.0, 1.0), 'silu': (-0.5, 3.0),
               'identity': (-3.0, 3.0)}[activation]
  return np.linspace(low, high, GATE_HISTOGRAM_BINS + 1, dtype=np.float32)


def measured_positions(tokens: jax.Array, pad_id: int | None) -> jax.Array:
  """bool [batch, length]: the positions the paper's measurements read, every one but padding."""
  return jnp.ones(tokens.shape, bool) if pad_id is None else tokens != pad_id


class KVCache(NamedTuple):
  """Keys and values of every layer for generation: slot j holds position j.

  key, value: [layers, batch, max_length, kv_heads, head_dim]; length: int [batch], the
  positions filled so far (where the next tokens go). A call must leave length <= max_length:
  the rows of a call that would write past the end get NaN logits (a write there would land on
  the last slots)."""
  key: jax.Array
  value: jax.Array
  length: jax.Array

  @classmethod
  def empty(cls, cfg, batch: int, max_length: int, dtype) -> 'KVCache':
    shape = (cfg.num_layers, batch, max_length, cfg.num_kv_heads, cfg.head_dim)
    return cls(jnp.zeros(shape, dtype), jnp.zeros(shape, dtype), jnp.zeros((batch,), jnp.int32))


class ModelOutput(NamedTuple):
  """logits: float32 [batch, length, vocab]; None when the call was given targets.
  aux_losses: mixture-of-experts load_balance_loss and router_z_loss, mean over layers, each
    over the tokens not equal to pad_id ({} for a dense model).
  stats: with analysis=True, per-layer arrays (leading axis: layers); those that reduce over
    positions leave out the tokens equal to pad_id:
    first_token_attention [layers, batch, heads, length]: each query's attention on token 0;
    attention_map [layers, heads, m, m]: attention among the first m = min(64, length)
      positions, mean over the batch;
    value_norm [layers, batch, length, kv_heads]: |v| of each position's value state;
    max_activation [layers]: max |hidden state| of the residual stream after each layer;
    gate_score_sum [layers], gate_score_histogram [layers, bins]: the sum of the gate score
      applied to each gated element and their counts by value (total: how many were summed)
      (gated models only).
  cache: the updated KVCache when one was given, else None.
  loss_sum, num_tokens: given targets, their summed cross-entropy and how many counted (targets
    equal to pad_id do not), else None."""
  logits: jax.Array | None
  aux_losses: dict
  stats: dict
  cache: KVCache | None
  loss_sum: jax.Array | None = None
  num_tokens: jax.Array | None = None


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
    self.impl = cfg.attention_impl
    self.fused_projections = cfg.fused_projections
    self.sdpa_nonlinearity = cfg.gate.sdpa_nonlinearity
    self.eps = cfg.norm_eps

  def _project(self, x: jax.Array) -> tuple[dict[str, jax.Array], jax.Array | None]:
    """The query, key and value projections of x, each [batch, length, heads, head_dim], and
    the logits of a gate whose W_theta one of their kernels carries (else None)."""
    gate, logits = self.gate, None
    kernels = {name: kernel[...].astype(x.dtype)
               for name, kernel in (('query', self.wq), ('key', self.wk), ('value', self.wv))}
    kv_heads = kernels['key'].shape[1]
    if self.fused_projections and splits_evenly('kv_heads', kv_heads):
      # One product: the kernels side by side per KV head, [embed, kv_heads, ...], so a tensor
      # axis that splits the KV heads splits the fused kernel and its output the same way.
      grouped = [kernel.reshape(kernel.shape[0], kv_heads, -1) for kernel in kernels.values()]
      parts = jnp.split(dense(x, jnp.concatenate(grouped, axis=-1)),
                        np.cumsum([kernel.shape[-1] for kernel in grouped])[:-1], axis=-1)
      projections = {name: part.reshape(*x.shape[:-1], *kernels[name].shape[1:])
                     for name, part in zip(kernels, parts)}
      if gate.fused_into:
        projections[gate.fused_into], logits = gate.split(projections[gate.fused_into])
      return projections, logits
    if gate.fused_into:
      # The kernel, not its output, is split: slicing activations costs XLA:CPU a copy each
      # way, slicing the kernel costs nothing measurable.
      kernels[gate.fused_into], gate_kernel = gate.split(kernels[gate.fused_into])
      logits = dense(x, gate_kernel)
    return {name: dense(x, kernel) for name, kernel in kernels.items()}, logits

  def __call__(self, x: jax.Array, rope, cache=None, measured: jax.Array | None = None):
    """x: normed block input [batch, length, embed]; rope: (sin, cos) at x's positions;
    cache: None, or this layer's (key, value, length) to write into and attend over;
    measured: None, or bool [batch, length], the positions the paper's measurements read.
    Returns ([batch, length, embed], outputs: stats and, with a cache, 'key' and 'value')."""
    gate, score = self.gate, None
    projections, logits = self._project(x)
    if gate.enabled and not gate.fused_into:
      logits = gate.logits(x)
    if gate.position in projections:  # G2, G3, G4 gate a projection's output directly.
      projections[gate.position], score = gate(projections[gate.position], logits)

    q = constrain(projections['query'], ('batch', 'length', 'heads', 'head_dim'))
    k = constrain(projections['key'], ('batch', 'length', 'kv_heads', 'head_dim'))
    v = constrain(projections['value'], ('batch', 'length', 'kv_heads', 'head_dim'))
    if self.q_norm is not None:
      q, k = self.q_norm(q), self.k_norm(k)
    q, k = apply_rope(q, *rope), apply_rope(k, *rope)

    outputs, q_offset = {}, None
    if cache is not None:
      cache_key, cache_value, q_offset = cache
      write = jax.vmap(lambda c, new, at: jax.lax.dynamic_update_slice_in_dim(c, new, at, 0))
      k = outputs['key'] = write(cache_key, k.astype(cache_key.dtype), q_offset)
      v = outputs['value'] = write(cache_value, v.astype(cache_value.dtype), q_offset)
    kv_values = v  # value_norm is per KV head, however the heads are sharded.
    k, v = attention_lib.kv_for_head_shards(q, k, v)

    if measured is not None:
      y, probs = attention_lib.softmax_attention(q, k, v, q_offset)
      m = min(ATTENTION_MAP_SIZE, probs.shape[-1])
      rows = measured[:, :m].astype(jnp.float32)  # Each map row averages its measured queries.
      outputs.update(first_token_attention=probs[..., 0],
                     attention_map=jnp.einsum('bhqs,bq->hqs', probs[:, :, :m, :m], rows)
                     / jnp.maximum(jnp.sum(rows, axis=0), 1)[:, None],
                     value_norm=jnp.linalg.norm(kv_values.astype(jnp.float32), axis=-1))
    else:
      y = attention_lib.attention(q, k, v, self.impl, q_offset)
    y = sdpa_nonlinearity(y, self.sdpa_nonlinearity, self.eps)
    if gate.position == 'sdpa':
      y, score = gate(y, logits)
    out = dense(y, self.wo[...].astype(x.dtype), contract=2)
    if gate.position == 'dense':
      out, score = gate(out, logits)

    if measured is not None and score is not None:
      score = score.astype(jnp.float32)  # [batch, length, ...]
      weight = jnp.broadcast_to(measured.reshape(measured.shape + (1,) * (score.ndim - 2)),
                                score.shape).astype(jnp.float32)
      edges = gate_histogram_edges(gate.activation)
      outputs['gate_score_sum'] = jnp.sum(score * weight)
      outputs['gate_score_histogram'] = jnp.histogram(jnp.clip(score, edges[0], edges[-1]),
                                                      bins=edges, weights=weight)[0]
    return constrain(out, ACTIVATION_AXES), outputs


# A narrowed MLP width is a multiple of this, so tensor-parallel meshes up to 16 split it.
MLP_WIDTH_MULTIPLE = 16


def mlp_width(cfg) -> int:
  """The dense MLP width: mlp_dim, narrowed when match_baseline_params so that the gate's added
  parameters are taken out of the MLP (SwiGLU holds 3 * d_model parameters per unit of width):
  the multiple of MLP_WIDTH_MULTIPLE nearest the exact match, so the total stays within
  MLP_WIDTH_MULTIPLE / 2 * 3 * d_model parameters per layer of the ungated model's."""
  gate_params = gate_params_per_layer(cfg) if cfg.match_baseline_params else 0
  if not gate_params:
    return cfg.mlp_dim  # Nothing to pay for: the ungated baseline keeps its width.
  exact = cfg.mlp_dim - gate_params / (3 * cfg.d_model)
  return MLP_WIDTH_MULTIPLE * round(exact / MLP_WIDTH_MULTIPLE)


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
                        param_dtype=dtype, fused=cfg.fused_projections, rngs=rngs)

  def __call__(self, x, rope, cache=None, measured: jax.Array | None = None,
               counted: jax.Array | None = None):
    """Returns (x, outputs): the attention's outputs, MoE auxiliary losses (over the `counted`
    tokens, when given: PAD left out), max_activation (over the `measured` positions, when
    given)."""
    attended, outputs = self.attention(self.attention_norm(x), rope, cache, measured)
    if self.sandwich_norm is not None:
      attended = self.sandwich_norm(attended)
    x = x + attended
    if isinstance(self.mlp, MoE):
      mlp, aux_losses = self.mlp(self.mlp_norm(x), counted)
      outputs.update(aux_losses)
    else:
      mlp = self.mlp(self.mlp_norm(x))
    x = constrain(x + mlp, ACTIVATION_AXES)
    if measured is not None:
      outputs['max_activation'] = jnp.max(jnp.where(measured[..., None],
                                                    jnp.abs(x.astype(jnp.float32)), 0))
    return x, outputs


def _stacked_blocks(cfg, rngs: nnx.Rngs) -> Block:
  """One Block whose parameters carry a leading `layers` axis of num_layers."""
  @nnx.split_rngs(splits=cfg.num_layers)
  @nnx.vmap(in_axes=0, out_axes=0)
  def create(rngs):
    return Block(cfg, rngs=rngs)

  blocks = create(rngs)
  for _, variable in nnx.iter_graph(blocks):
    if isinstance(variable, nnx.Param):
      variable.set_metadata(logical_axes=('layers', *variable.get_metadata()['logical_axes']))
  return blocks


class Transformer(nnx.Module):
  """The language model. Parameters in `param_dtype`, computation in `dtype`."""

  def __init__(self, cfg, *, rngs: nnx.Rngs):
    self.dtype = jnp.dtype(cfg.dtype)
    param_dtype = jnp.dtype(cfg.param_dtype)
    self.embedding = param(rngs, (cfg.vocab_size, cfg.d_model), ('vocab', 'embed'), param_dtype,
                           cfg.init_std)
    if cfg.scan_layers:
      self.layers, self.blocks = _stacked_blocks(cfg, rngs), None
    else:
      self.layers = None
      self.blocks = nnx.List([Block(cfg, rngs=rngs) for _ in range(cfg.num_layers)])
    self.final_norm = RMSNorm(cfg.d_model, 'embed', eps=cfg.norm_eps,
                              plus_one=cfg.norm_plus_one, param_dtype=param_dtype, rngs=rngs)
    self.lm_head = None if cfg.tie_embeddings else param(
        rngs, (cfg.d_model, cfg.vocab_size), ('embed', 'vocab'), param_dtype, cfg.init_std)
    inv_freq, attention_factor = rope_frequencies(int(cfg.head_dim * cfg.rope_fraction),
                                                  cfg.rope_theta, cfg.rope_scaling)
    self.rope = (tuple(inv_freq.tolist()), attention_factor)  # Static: hashable numbers.
    self.remat_policy = cfg.remat
    self.loss_chunk = cfg.loss_chunk

  def __call__(self, tokens: jax.Array, cache: KVCache | None = None, analysis: bool = False,
               targets: jax.Array | None = None, pad_id: int | None = None) -> ModelOutput:
    """tokens: int [batch, length]; with a cache, placed at positions cache.length onwards.
    targets: int [batch, length], the next tokens: the output has their loss (those equal to
    pad_id not counted) and no logits."""
    assert not (analysis and cache is not None), 'analysis runs on whole sequences'
    if cache is not None and tokens.shape[1] > cache.key.shape[2]:
      raise ValueError(f'{tokens.shape[1]} tokens do not fit a KV cache of max_length '
                       f'{cache.key.shape[2]}.')
    # The lookup runs where the table's columns live (fsdp), on each data shard's tokens, then
    # moves to the activations' layout (an all-to-all). Left to the partitioner, it gathered
    # the global batch's activations in the backward pass when data > 1 (across slices).
    x = jnp.take(self.embedding[...], tokens, axis=0)
    x = constrain(x, ('lookup_batch', 'length', 'embed'))
    x = constrain(x.astype(self.dtype), ACTIVATION_AXES)
    positions = np.arange(tokens.shape[1])[None, :]  # Static: the RoPE tables are constants.
    if cache is not None:
      positions = cache.length[:, None] + positions
    rope = rope_tables(positions, np.asarray(self.rope[0], np.float32), self.rope[1])
    measured = measured_positions(tokens, pad_id) if analysis else None
    counted = None if pad_id is None else measured_positions(tokens, pad_id)  # For MoE losses.
    x, per_layer = self._layers(x, rope, cache, measured, counted)

    x = self.final_norm(x)
    kernel = self.embedding[...].T if self.lm_head is None else self.lm_head[...]
    kernel = kernel.astype(self.dtype)
    logits, loss_sum, num_tokens = None, None, None
    if targets is None:
      logits = output_logits(x, kernel)
      if cache is not None:
        overflow = cache.length + tokens.shape[1] > cache.key.shape[2]
        logits = jnp.where(overflow[:, None, None], jnp.nan, logits)
    else:
      loss_sum, num_tokens = next_token_loss(x, kernel, targets, pad_id, self.loss_chunk)
    aux_losses = {name: jnp.mean(per_layer.pop(name))
                  for name in ('load_balance_loss', 'router_z_loss') if name in per_layer}
    new_cache = None
    if cache is not None:
      new_cache = KVCache(per_layer.pop('key'), per_layer.pop('value'),
                          cache.length + tokens.shape[1])
    return ModelOutput(logits, aux_losses, per_layer if analysis else {}, new_cache, loss_sum,
                       num_tokens)

  def _layers(self, x, rope, cache, measured, counted):
    """Runs every block; returns x and the blocks' outputs stacked over layers."""
    def block_fn(graphdef):
      def layer(x, rope, length, inputs):
        params, key, value = inputs
        layer_cache = None if key is None else (key, value, length)
        return nnx.merge(graphdef, params)(x, rope, layer_cache, measured, counted)
      policy = REMAT_POLICIES[self.remat_policy]
      if policy is None or measured is not None:
        return layer
      return jax.checkpoint(layer, policy=policy, prevent_cse=self.layers is None)

    length = None if cache is None else cache.length
    caches = (None, None) if cache is None else (cache.key, cache.value)
    if self.layers is not None:
      graphdef, params = nnx.split(self.layers)
      layer = block_fn(graphdef)
      return jax.lax.scan(lambda x, inputs: layer(x, rope, length, inputs), x,
                          (params, *caches))
    per_layer = []
    for index, block in enumerate(self.blocks):
      graphdef, params = nnx.split(block)
      layer_caches = [None if c is None else c[index] for c in caches]
      x, outputs = block_fn(graphdef)(x, rope, length, (params, *layer_caches))
      per_layer.append(outputs)
    return x, jax.tree.map(lambda *values: jnp.stack(values), *per_layer)


def apply(graphdef, params, tokens: jax.Array, cache: KVCache | None = None,
          analysis: bool = False, targets: jax.Array | None = None,
          pad_id: int | None = None) -> ModelOutput:
  """Runs the model functionally: the one way training, evaluation and generation call it."""
  return nnx.merge(graphdef, params)(tokens, cache=cache, analysis=analysis, targets=targets,
                                     pad_id=pad_id)
