"""Mixture-of-experts feed-forward layer (`config.model.moe`, used when num_experts > 0).

Softmax router over experts, top-k experts per token (weights renormalised over the chosen k
when `normalize_top_k`), SwiGLU experts, and optionally a shared expert that every token passes
through, scaled by a sigmoid gate of its own (`shared_expert_dim` > 0, as Qwen3-Next).

Two ways to run the routed experts (`impl`):
  capacity  tokens are routed within each sequence into a fixed number of slots per expert,

                capacity = ceil(capacity_factor * seq_len * top_k / num_experts),

            filled first by every token's first choice, then second choices, and so on, in
            token order; an assignment past an expert's capacity is dropped (the residual
            stream carries that token). capacity_factor = 0 is dropless (capacity = seq_len):
            every expert then runs over seq_len slots, num_experts / top_k times the routed
            work. Experts are sharded over the `expert` mesh axis and run where they live.
  ragged    dropless grouped matmuls: each device sorts its own tokens' assignments by expert
            and runs one GEMM per expert over exactly its rows (`grouped_matmul`), so the work
            is the routed work. Expert weights are gathered where they are sharded over
            `expert` or `fsdp` (as FSDP gathers dense weights), and stay split over `tensor`.
            On TPU the grouped GEMMs are the Pallas megablox kernels, forward and backward
            (XLA's own ragged_dot lowers the weight gradient to a dense product over every
            expert); elsewhere jax.lax.ragged_dot, which XLA:CPU expands densely.

Auxiliary losses (returned with the output, averaged over layers by the model):
  load balance   num_experts * sum_e f_e * P_e, with f_e the share of (token, choice)
                 assignments sent to expert e and P_e the mean router probability of e, both
                 over the whole global batch (jit sees the global batch, so this is one global
                 reduction, not a per-device loss); with train.microbatches > 1, over each
                 microbatch, and the mean of those weighted by their tokens (the trainer).
                 1.0 for a uniform router.
  router z       mean over tokens of logsumexp(router logits)^2.
Both average over the tokens that count (the model leaves out PAD input tokens); PAD tokens are
still routed and computed, as every position is.
"""

import math

import jax
import jax.numpy as jnp
from flax import nnx
from jax.ad_checkpoint import checkpoint_name

from gated_attention.layers import SwiGLU, param
from gated_attention.sharding import constrain, logical_to_spec, target_platform

# The name of the experts' matmul outputs, which model.remat=save_dots keeps: they carry the
# expert axis as a batch dimension (or are grouped matmuls), which the dot policy passes over.
EXPERT_MATMUL = 'expert_matmul'


def expert_capacity(seq_len: int, top_k: int, num_experts: int, capacity_factor: float) -> int:
  """Slots per expert per sequence; seq_len (dropless) when capacity_factor is 0."""
  if capacity_factor == 0:
    return seq_len
  return min(seq_len, math.ceil(capacity_factor * seq_len * top_k / num_experts))


def route(router_logits: jax.Array, top_k: int, normalize_top_k: bool):
  """Top-k routing. router_logits: float32 [batch, seq, experts].
  Returns (expert [batch, k, seq] int, weight [batch, k, seq] float32, probs [batch, seq,
  experts]), choice-major: all first choices, then all second choices."""
  probs = jax.nn.softmax(router_logits, axis=-1)
  weight, expert = jax.lax.top_k(probs, top_k)  # [batch, seq, k]
  if normalize_top_k:
    weight = weight / jnp.sum(weight, axis=-1, keepdims=True)
  return jnp.swapaxes(expert, 1, 2), jnp.swapaxes(weight, 1, 2), probs


def capacity_slots(expert: jax.Array, num_experts: int) -> jax.Array:
  """Each assignment's slot in its expert's buffer, in choice-major then token order:
  expert [batch, k, seq] -> slot [batch, k, seq]."""
  batch, top_k, seq = expert.shape
  chosen = jax.nn.one_hot(expert.reshape(batch, top_k * seq), num_experts, dtype=jnp.int32)
  return jnp.sum((jnp.cumsum(chosen, axis=1) - 1) * chosen, axis=-1).reshape(batch, top_k, seq)


def load_balance_loss(probs: jax.Array, expert: jax.Array,
                      counted: jax.Array | None = None) -> jax.Array:
  """num_experts * sum_e f_e * P_e over the batch's counted tokens: probs [batch, seq, experts],
  expert [batch, k, seq] the chosen experts (before capacity), counted bool [batch, seq] (None:
  every token). 1 when the router is uniform; num_experts when every token sends everything to
  one expert."""
  num_experts = probs.shape[-1]
  assigned = jax.nn.one_hot(expert, num_experts, dtype=jnp.float32)  # [batch, k, seq, experts]
  fraction = _counted_mean(jnp.mean(assigned, axis=1), counted)
  return num_experts * jnp.sum(fraction * _counted_mean(probs, counted))


def router_z_loss(logits: jax.Array, counted: jax.Array | None = None) -> jax.Array:
  """Mean over the counted tokens of logsumexp(router logits) ** 2 (ST-MoE's z-loss)."""
  return _counted_mean(jnp.square(jax.nn.logsumexp(logits, axis=-1)), counted)


def _counted_mean(x: jax.Array, counted: jax.Array | None) -> jax.Array:
  """Mean of x [batch, seq, ...] over its tokens where counted [batch, seq] (None: all); 0
  where none counts."""
  if counted is None:
    return jnp.mean(x, axis=(0, 1))
  weight = counted.astype(jnp.float32).reshape(counted.shape + (1,) * (x.ndim - 2))
  return jnp.sum(x * weight, axis=(0, 1)) / jnp.maximum(jnp.sum(counted), 1)


def _swiglu_rows(h: jax.Array) -> jax.Array:
  """silu(gate) * up of fused [..., 2, mlp] projections."""
  return jax.nn.silu(h[..., 0, :]) * h[..., 1, :]


# Row tiles of the megablox kernels: rows are padded to a multiple of this.
MEGABLOX_ROWS = 128


def grouped_matmul(lhs: jax.Array, rhs: jax.Array, group_sizes: jax.Array,
                   pallas: bool) -> jax.Array:
  """Rows of lhs [m, k], sorted into consecutive groups of group_sizes [g] (int32) rows, each
  times its group's matrix of rhs [g, k, n] -> [m, n] in lhs's dtype.

  pallas: the megablox grouped-GEMM kernels (jax.experimental.pallas.ops.tpu.megablox; its
  custom VJP runs the gradients as grouped GEMMs too), in interpret mode off TPU; rows are
  padded with zeros to a multiple of MEGABLOX_ROWS, counted in the last group. Otherwise
  jax.lax.ragged_dot."""
  if not pallas:
    return jax.lax.ragged_dot(lhs, rhs, group_sizes)
  from jax.experimental.pallas.ops.tpu.megablox import gmm  # Pallas: imported where used.
  rows, (_, k, n) = lhs.shape[0], rhs.shape
  padding = -rows % MEGABLOX_ROWS
  lhs = jnp.pad(lhs, ((0, padding), (0, 0)))
  group_sizes = group_sizes.at[-1].add(padding)
  tiling = (MEGABLOX_ROWS, min(k, 128), min(n, 128))
  out = gmm(lhs, rhs, group_sizes, lhs.dtype, tiling, None, None, False,
            target_platform() != 'tpu')
  return out[:rows]


def _ragged_experts(x, expert, weight, wi, wo, pallas: bool):
  """Dropless routed experts on one device's tokens, sorted by expert into grouped matmuls.
  x [b, t, e]; expert, weight [b, k, t]; wi [E, e, 2, m]; wo [E, m, e]. Returns [b, t, e]."""
  batch, top_k, seq = expert.shape
  num_experts, embed, _, mlp = wi.shape
  flat_expert = expert.reshape(-1)
  order = jnp.argsort(flat_expert, stable=True)
  token = (order // (top_k * seq)) * seq + order % seq  # Choice-major index -> token index.
  group_sizes = jnp.bincount(flat_expert, length=num_experts).astype(jnp.int32)
  rows = x.reshape(batch * seq, embed)[token]
  h = grouped_matmul(rows, wi.reshape(num_experts, embed, 2 * mlp), group_sizes, pallas)
  h = _swiglu_rows(checkpoint_name(h, EXPERT_MATMUL).reshape(-1, 2, mlp))
  out = checkpoint_name(grouped_matmul(h, wo, group_sizes, pallas), EXPERT_MATMUL)
  out = out * weight.reshape(-1)[order, None].astype(x.dtype)
  return jnp.zeros((batch * seq, embed), x.dtype).at[token].add(out).reshape(batch, seq, embed)


class MoE(nnx.Module):
  """Routed SwiGLU experts (and an optional shared expert): [batch, seq, embed] -> same."""

  def __init__(self, cfg, *, std: float, out_std: float, param_dtype, rngs: nnx.Rngs):
    moe = cfg.moe
    self.num_experts, self.top_k, self.impl = moe.num_experts, moe.top_k, moe.impl
    self.capacity_factor, self.normalize_top_k = moe.capacity_factor, moe.normalize_top_k
    self.router = param(rngs, (cfg.d_model, moe.num_experts), ('embed', None), param_dtype, std)
    self.wi = param(rngs, (moe.num_experts, cfg.d_model, 2, moe.expert_mlp_dim),
                    ('expert', 'embed', None, 'mlp'), param_dtype, std)
    self.wo = param(rngs, (moe.num_experts, moe.expert_mlp_dim, cfg.d_model),
                    ('expert', 'mlp', 'embed'), param_dtype, out_std)
    if moe.shared_expert_dim:
      self.shared_expert = SwiGLU(cfg.d_model, moe.shared_expert_dim, std=std, out_std=out_std,
                                  param_dtype=param_dtype, fused=cfg.fused_projections, rngs=rngs)
      self.shared_expert_gate = param(rngs, (cfg.d_model, 1), ('embed', None), param_dtype, std)
    else:
      self.shared_expert = self.shared_expert_gate = None

  def __call__(self, x: jax.Array, counted: jax.Array | None = None) -> tuple[jax.Array, dict]:
    """Returns (output, {'load_balance_loss', 'router_z_loss'}), the losses over the counted
    tokens (bool [batch, seq]: PAD left out; None: every token). Every token is routed."""
    logits = jnp.einsum('bte,ex->btx', x, self.router[...].astype(x.dtype),
                        preferred_element_type=jnp.float32)
    expert, weight, probs = route(logits, self.top_k, self.normalize_top_k)
    aux = {'load_balance_loss': load_balance_loss(probs, expert, counted),
           'router_z_loss': router_z_loss(logits, counted)}
    wi, wo = self.wi[...].astype(x.dtype), self.wo[...].astype(x.dtype)
    if self.impl == 'ragged':
      out = self._ragged(x, expert, weight, wi, wo)
    else:
      out = self._capacity(x, expert, weight, wi, wo)
    if self.shared_expert is not None:
      shared_gate = jax.nn.sigmoid(x @ self.shared_expert_gate[...].astype(x.dtype))
      out = out + shared_gate * self.shared_expert(x)
    return out, aux

  def _capacity(self, x, expert, weight, wi, wo):
    batch, seq, embed = x.shape
    capacity = expert_capacity(seq, self.top_k, self.num_experts, self.capacity_factor)
    slot = capacity_slots(expert, self.num_experts)
    weight = jnp.where(slot < capacity, weight, 0.0)
    # Scatter each kept (token, choice) into its expert's buffer; dropped ones go to a spare row.
    flat_slot = jnp.where(weight > 0, expert * capacity + slot, self.num_experts * capacity)
    flat_slot = flat_slot.reshape(batch, self.top_k * seq)
    tokens = jnp.tile(x, (1, self.top_k, 1))  # [b, k * t, e], choice-major like flat_slot.
    buffer = jax.vmap(lambda t, s: jnp.zeros((self.num_experts * capacity + 1, embed), x.dtype)
                      .at[s].set(t))(tokens, flat_slot)
    buffer = buffer[:, :-1].reshape(batch, self.num_experts, capacity, embed)
    buffer = constrain(jnp.swapaxes(buffer, 0, 1), ('expert', 'batch', None, 'embed'))

    # Every intermediate keeps the buffer's sharding, so the experts run where they live, on
    # their share of the batch (unconstrained, the backward pass gathered the global batch's
    # buffers and every expert's weights).
    h = _swiglu_rows(checkpoint_name(jnp.einsum('xbce,xeim->xbcim', buffer, wi), EXPERT_MATMUL))
    h = constrain(h, ('expert', 'batch', None, 'mlp'))
    out = checkpoint_name(jnp.einsum('xbcm,xme->xbce', h, wo), EXPERT_MATMUL)
    out = constrain(out, ('expert', 'batch', None, 'embed'))
    out = jnp.swapaxes(out, 0, 1).reshape(batch, self.num_experts * capacity, embed)
    out = jnp.concatenate([out, jnp.zeros((batch, 1, embed), x.dtype)], axis=1)
    gathered = jnp.take_along_axis(out, flat_slot[..., None], axis=1)  # [b, k * t, e]
    gathered = gathered.reshape(batch, self.top_k, seq, embed)
    return jnp.einsum('bkte,bkt->bte', gathered, weight.astype(x.dtype))

  def _ragged(self, x, expert, weight, wi, wo):
    pallas = target_platform() == 'tpu'
    if jax.sharding.get_abstract_mesh().empty:
      return _ragged_experts(x, expert, weight, wi, wo, pallas)
    tokens_spec = logical_to_spec(('batch', None, None))
    wi_spec = logical_to_spec(('expert', 'embed', None, 'mlp'))
    wo_spec = logical_to_spec(('expert', 'mlp', 'embed'))

    def local(x, expert, weight, wi, wo):
      # Gather whole experts and the embedding width; keep this shard's part of the mlp width
      # and sum the partial outputs over it.
      wi = _all_gather(wi, wi_spec, (0, 1))
      wo = _all_gather(wo, wo_spec, (0, 2))
      out = _ragged_experts(x, expert, weight, wi, wo, pallas)
      return jax.lax.psum(out, wi_spec[3]) if wi_spec[3] else out

    return jax.shard_map(local, in_specs=(tokens_spec, tokens_spec, tokens_spec, wi_spec,
                                          wo_spec),
                         out_specs=tokens_spec, check_vma=False)(x, expert, weight, wi, wo)


def _all_gather(w, spec, dims):
  """Gathers w over the mesh axes that shard its dimensions `dims` (tiled, in place)."""
  for dim in dims:
    if spec[dim]:
      w = jax.lax.all_gather(w, spec[dim], axis=dim, tiled=True)
  return w
