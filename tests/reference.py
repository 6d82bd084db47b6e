"""NumPy references written from the formulas in PAPER.md, independent of the library's code."""

import numpy as np


def sigmoid(x):
  return 1.0 / (1.0 + np.exp(-x))


ACTIVATIONS = {
    'sigmoid': sigmoid,
    'silu': lambda x: x * sigmoid(x),
    'identity': lambda x: x,
    'ns_sigmoid': lambda x: 0.5 + 0.5 * sigmoid(x),
}


def rms_norm(x, scale=None, eps=1e-6):
  y = x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps)
  return y if scale is None else y * scale


def rope(x, positions, rotary_dim, theta):
  """Rotate-half RoPE on the first rotary_dim dims of x [length, heads, head_dim]."""
  half = rotary_dim // 2
  out = x.copy()
  for t, p in enumerate(positions):
    for i in range(half):
      angle = p * theta ** (-2.0 * i / rotary_dim)
      a, b = x[t, :, i], x[t, :, i + half]
      out[t, :, i] = a * np.cos(angle) - b * np.sin(angle)
      out[t, :, i + half] = b * np.cos(angle) + a * np.sin(angle)
  return out


def causal_softmax_attention(q, k, v):
  """q [T, H, D]; k, v [T, K, D]; query head h reads KV head h // (H // K)."""
  length, heads, head_dim = q.shape
  group = heads // k.shape[1]
  out = np.zeros_like(q)
  probs = np.zeros((heads, length, length))
  for h in range(heads):
    kv = h // group
    for i in range(length):
      logits = np.array([q[i, h] @ k[j, kv] / np.sqrt(head_dim) for j in range(i + 1)])
      weights = np.exp(logits - logits.max())
      weights /= weights.sum()
      probs[h, i, :i + 1] = weights
      out[i, h] = weights @ v[:i + 1, kv]
  return out, probs


def gate(y, logits, gate_config):
  """Y' = Y * act(logits) or Y + act(logits); head-shared averages logits over heads (axis -2)."""
  if gate_config['head_shared']:
    logits = np.repeat(logits.mean(axis=-2, keepdims=True), y.shape[-2], axis=-2)
  score = ACTIVATIONS[gate_config['activation']](logits)
  if score.shape[-1] == 1 and y.shape[-1] != 1:
    score = np.repeat(score, y.shape[-1], axis=-1)
  return y * score if gate_config['mode'] == 'multiplicative' else y + score


def attention_block(x, weights, cfg, gate_config):
  """One attention block on a single sequence x [T, d_model] (already normed).

  weights: 'query' [E, H, D], 'key'/'value' [E, K, D], 'out' [H, D, E], optional 'q_norm',
  'k_norm' [D], and 'gate' (the gate's W_theta: [E, n, width], or [E, E] for G5) or, for an
  input-independent gate, 'score' (its logits: [n, width], or [E] for G5).
  """
  position = gate_config['position']
  q = np.einsum('te,ehd->thd', x, weights['query'])
  k = np.einsum('te,ehd->thd', x, weights['key'])
  v = np.einsum('te,ehd->thd', x, weights['value'])
  gate_logits = None
  if 'score' in weights:  # Input-independent: the same learned logits at every position.
    gate_logits = np.broadcast_to(weights['score'], (x.shape[0], *weights['score'].shape))
  elif position in ('sdpa', 'query', 'key', 'value'):
    gate_logits = np.einsum('te,ehw->thw', x, weights['gate'])
  elif position == 'dense':
    gate_logits = x @ weights['gate']
  if position == 'query':
    q = gate(q, gate_logits, gate_config)
  if position == 'key':
    k = gate(k, gate_logits, gate_config)
  if position == 'value':
    v = gate(v, gate_logits, gate_config)
  if 'q_norm' in weights:
    q, k = rms_norm(q, weights['q_norm']), rms_norm(k, weights['k_norm'])
  positions = np.arange(x.shape[0])
  rotary = int(cfg['head_dim'] * cfg['rope_fraction'])
  q = rope(q, positions, rotary, cfg['rope_theta'])
  k = rope(k, positions, rotary, cfg['rope_theta'])
  y, _ = causal_softmax_attention(q, k, v)
  if gate_config['sdpa_nonlinearity'] == 'rms_norm':  # Per head, no scale ("group norm").
    y = rms_norm(y, eps=cfg['norm_eps'])
  elif gate_config['sdpa_nonlinearity'] == 'silu':
    y = ACTIVATIONS['silu'](y)
  if position == 'sdpa':
    y = gate(y, gate_logits, gate_config)
  out = np.einsum('thd,hde->te', y, weights['out'])
  if position == 'dense':
    out = gate(out[:, None, :], gate_logits[:, None, :], gate_config)[:, 0, :]
  return out


def yarn(rotary_dim, theta, factor, original_max_position, beta_fast=32.0, beta_slow=1.0):
  """YaRN's inverse frequencies and attention factor, dimension by dimension in float64: the
  frequency of pair i turns r_i = L / (2 pi theta^(2i/D)) times over the original context L;
  the ramp runs linearly over pair indices from the (floored) index turning beta_fast times to
  the (ceiled) index turning beta_slow times; below it frequencies are kept, above it divided
  by the factor; the attention factor is 0.1 ln(factor) + 1."""
  def index_turning(rotations):
    return rotary_dim * np.log(original_max_position / (rotations * 2 * np.pi)) / (
        2 * np.log(theta))
  low = max(np.floor(index_turning(beta_fast)), 0)
  high = min(np.ceil(index_turning(beta_slow)), rotary_dim - 1)
  inv_freq = []
  for i in range(rotary_dim // 2):
    base = theta ** (-2.0 * i / rotary_dim)
    interpolated = min(max((i - low) / (high - low), 0.0), 1.0)  # 0: kept, 1: divided.
    inv_freq.append(base / factor * interpolated + base * (1 - interpolated))
  return np.array(inv_freq), 0.1 * np.log(factor) + 1.0
