"""Model FLOPs per token and peak FLOP/s per chip, for tokens_per_sec -> mfu.

mfu = flops_per_token * tokens_per_sec / (peak_flops_per_device * device_count), with
flops_per_token = 6 * (parameters used in matmuls) + 6 * layers * heads * head_dim * seq_len:
2 FLOPs per multiply-add, forward + backward = 3 x forward, and causal attention (QK^T and AV,
each heads * head_dim * seq_len / 2 multiply-adds per token) counted at half the square. Remat
recomputation is not counted (that is MFU, not hardware utilisation).
"""

import math

# Dense bf16 peak FLOP/s per chip, matched by substring of jax.Device.device_kind (first match).
PEAK_FLOPS_BY_DEVICE_KIND = (
    ('TPU v6 lite', 918e12),
    ('TPU v5 lite', 197e12),
    ('TPU v5p', 459e12),
    ('TPU v5', 459e12),
    ('TPU v4', 275e12),
    ('H200', 989e12),
    ('H100 PCIe', 756e12),
    ('H100 NVL', 835e12),
    ('H100', 989e12),
    ('A100', 312e12),
)

# Parameters that multiply activations once per token (the embedding only when it is tied, as
# then it is also the output matmul; a lookup costs no FLOPs).
_MATMUL_PARAM_NAMES = ('wq', 'wk', 'wv', 'wo', 'wi', 'kernel', 'lm_head', 'router',
                       'shared_expert_gate')


def peak_flops_per_device(device_kind: str, override: float = 0.0) -> float | None:
  """Peak FLOP/s of one chip, the override if positive, or None for an unknown kind (CPU)."""
  return override if override > 0 else by_device_kind(PEAK_FLOPS_BY_DEVICE_KIND, device_kind)


def by_device_kind(table, device_kind: str):
  """The value of the first (name, value) of `table` whose name is in `device_kind` (a variant
  of a chip comes before the name it contains), else None."""
  return next((value for name, value in table if name in device_kind), None)


def active_fraction(model_config, path) -> float:
  """Share of a parameter each token uses: top_k / num_experts for expert kernels, else 1."""
  moe = model_config.moe
  if moe.num_experts and path[-2:] in (('mlp', 'wi'), ('mlp', 'wo')):
    return moe.top_k / moe.num_experts
  return 1.0


def active_matmul_params(model_config, flat_params) -> float:
  """Matmul parameters one token passes through; flat_params: iterable of (path, shape)."""
  names = _MATMUL_PARAM_NAMES + (('embedding',) if model_config.tie_embeddings else ())
  return sum(math.prod(shape) * active_fraction(model_config, path)
             for path, shape in flat_params if path[-1] in names)


def flops_per_token(model_config, seq_len: int, flat_params) -> float:
  """Training FLOPs per token (forward and backward)."""
  attention = model_config.num_layers * model_config.num_heads * model_config.head_dim * seq_len
  return 6 * active_matmul_params(model_config, flat_params) + 6 * attention
