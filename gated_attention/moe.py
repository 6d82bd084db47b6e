"""Mixture-of-experts feed-forward layer (`config.model.moe`, used when num_experts > 0).

Softmax router over experts, top-k experts per token (weights renormalised over the chosen k
when `normalize_top_k`), SwiGLU experts. Tokens are routed within each sequence with a fixed
capacity per expert,

    capacity = ceil(capacity_factor * seq_len * top_k / num_experts),

filled first by every token's first choice, then second choices, and so on, in token order;
an assignment past an expert's capacity is dropped (that expert adds nothing for that token;
the residual stream carries it). capacity_factor = 0 means dropless: capacity = seq_len, so no
assignment is ever dropped (each token picks an expert at most once); every expert then runs
over seq_len slots, num_experts / top_k times the routed work, which suits small models and
tests, not the paper's scale (its preset uses 1.25).

Auxiliary losses, sown as nnx.Intermediate values `load_balance_loss` and `router_z_loss`:
  load balance   num_experts * sum_e f_e * P_e, with f_e the share of (token, choice)
                 assignments sent to expert e and P_e the mean router probability of e, both
                 over the whole global batch (jit sees the global batch, so this is one global
                 reduction, not a per-device loss). 1.0 for a uniform router.
  router z       mean over tokens of logsumexp(router logits)^2.
"""

import math

import jax
import jax.numpy as jnp
from flax import nnx

from gated_attention.layers import param
from gated_attention.sharding import constrain


def expert_capacity(seq_len: int, top_k: int, num_experts: int, capacity_factor: float) -> int:
  """Slots per expert per sequence; seq_len (dropless) when capacity_factor is 0."""
  if capacity_factor == 0:
    return seq_len
  return min(seq_len, math.ceil(capacity_factor * seq_len * top_k / num_experts))


def route(router_logits: jax.Array, top_k: int, capacity: int, normalize_top_k: bool):
  """Top-k routing with capacity, per sequence.

  router_logits: float32 [batch, seq, experts].
  Returns (expert [batch, k, seq] int, slot [batch, k, seq] int, weight [batch, k, seq] float32
  with dropped assignments at weight 0, probs [batch, seq, experts]).
  """
  num_experts = router_logits.shape[-1]
  probs = jax.nn.softmax(router_logits, axis=-1)
  weight, expert = jax.lax.top_k(probs, top_k)  # [batch, seq, k]
  if normalize_top_k:
    weight = weight / jnp.sum(weight, axis=-1, keepdims=True)
  expert, weight = jnp.swapaxes(expert, 1, 2), jnp.swapaxes(weight, 1, 2)  # Choice-major order.
  batch, _, seq = expert.shape
  chosen = jax.nn.one_hot(expert.reshape(batch, top_k * seq), num_experts, dtype=jnp.int32)
  slot = jnp.sum((jnp.cumsum(chosen, axis=1) - 1) * chosen, axis=-1).reshape(batch, top_k, seq)
  weight = jnp.where(slot < capacity, weight, 0.0)
  return expert, slot, weight, probs


def load_balance_loss(probs: jax.Array, expert: jax.Array) -> jax.Array:
  """num_experts * sum_e f_e * P_e over the whole batch: probs [batch, seq, experts], expert
  [batch, k, seq] the chosen experts (before capacity). 1 when the router is uniform; num_experts
  when every token sends everything to one expert."""
  num_experts = probs.shape[-1]
  assigned = jax.nn.one_hot(expert, num_experts, dtype=jnp.float32)  # [batch, k, seq, experts]
  fraction = jnp.mean(assigned, axis=(0, 1, 2))
  return num_experts * jnp.sum(fraction * jnp.mean(probs, axis=(0, 1)))


class MoE(nnx.Module):
  """Routed SwiGLU experts: [batch, seq, embed] -> [batch, seq, embed]."""

  def __init__(self, cfg, *, std: float, out_std: float, param_dtype, rngs: nnx.Rngs):
    moe = cfg.moe
    self.num_experts, self.top_k = moe.num_experts, moe.top_k
    self.capacity_factor, self.normalize_top_k = moe.capacity_factor, moe.normalize_top_k
    self.router = param(rngs, (cfg.d_model, moe.num_experts), ('embed', None), param_dtype, std)
    self.wi = param(rngs, (moe.num_experts, cfg.d_model, 2, moe.expert_mlp_dim),
                    ('expert', 'embed', None, 'mlp'), param_dtype, std)
    self.wo = param(rngs, (moe.num_experts, moe.expert_mlp_dim, cfg.d_model),
                    ('expert', 'mlp', 'embed'), param_dtype, out_std)

  def __call__(self, x: jax.Array) -> jax.Array:
    batch, seq, embed = x.shape
    logits = jnp.einsum('bte,ex->btx', x, self.router[...].astype(x.dtype),
                        preferred_element_type=jnp.float32)
    capacity = expert_capacity(seq, self.top_k, self.num_experts, self.capacity_factor)
    expert, slot, weight, probs = route(logits, self.top_k, capacity, self.normalize_top_k)

    self.sow(nnx.Intermediate, 'load_balance_loss', load_balance_loss(probs, expert))
    self.sow(nnx.Intermediate, 'router_z_loss',
             jnp.mean(jnp.square(jax.nn.logsumexp(logits, axis=-1))))

    # Scatter each kept (token, choice) into its expert's buffer; dropped ones go to a spare row.
    flat_slot = jnp.where(weight > 0, expert * capacity + slot, self.num_experts * capacity)
    flat_slot = flat_slot.reshape(batch, self.top_k * seq)
    tokens = jnp.tile(x, (1, self.top_k, 1))  # [b, k * t, e], choice-major like flat_slot.
    buffer = jax.vmap(lambda t, s: jnp.zeros((self.num_experts * capacity + 1, embed), x.dtype)
                      .at[s].set(t))(tokens, flat_slot)
    buffer = buffer[:, :-1].reshape(batch, self.num_experts, capacity, embed)
    buffer = constrain(jnp.swapaxes(buffer, 0, 1), ('expert', 'batch', None, 'embed'))

    h = jnp.einsum('xbce,xeim->xbcim', buffer, self.wi[...].astype(x.dtype))
    h = jax.nn.silu(h[..., 0, :]) * h[..., 1, :]
    out = jnp.einsum('xbcm,xme->xbce', h, self.wo[...].astype(x.dtype))
    out = jnp.swapaxes(out, 0, 1).reshape(batch, self.num_experts * capacity, embed)
    out = jnp.concatenate([out, jnp.zeros((batch, 1, embed), x.dtype)], axis=1)
    gathered = jnp.take_along_axis(out, flat_slot[..., None], axis=1)  # [b, k * t, e]
    gathered = gathered.reshape(batch, self.top_k, seq, embed)
    return jnp.einsum('bkte,bkt->bte', gathered, weight.astype(x.dtype))
