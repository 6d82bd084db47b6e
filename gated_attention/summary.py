"""Parameters by part, total and active, and training FLOPs per token, from abstract shapes
only (nothing is allocated, so the 15B preset summarises in seconds)."""

import math

from gated_attention import config as config_lib
from gated_attention import flops as flops_lib
from gated_attention import state as state_lib
from gated_attention.gate import gate_params_per_layer

_ATTENTION_PARTS = {'wq': 'attention q', 'wk': 'attention k', 'wv': 'attention v',
                    'wo': 'attention o'}


def part_of(path, model_config) -> str:
  """The summary row a parameter belongs to."""
  name = path[-1]
  if name == 'embedding':
    return 'embedding'
  if name == 'lm_head':
    return 'output head'
  if name == 'scale':
    return 'norms'
  if 'shared_expert' in path or name == 'shared_expert_gate':
    return 'shared expert'
  if 'gate' in path:
    return 'gate'
  if 'attention' in path:
    return _ATTENTION_PARTS[name]
  if name == 'router':
    return 'router'
  return 'experts' if model_config.moe.num_experts else 'mlp'


def summarize(config) -> dict:
  """{'params_total', 'params_active', 'params_gate', 'flops_per_token', 'parts': {part:
  {'params', 'active'}}} for config.model at config.data.seq_len."""
  config_lib.validate(config)
  model = config.model
  flat = state_lib.flat_param_shapes(state_lib.abstract_model(model)[1])
  parts: dict[str, dict] = {}
  for path, shape in flat:
    row = parts.setdefault(part_of(path, model), {'params': 0, 'active': 0.0})
    row['params'] += math.prod(shape)
    row['active'] += math.prod(shape) * flops_lib.active_fraction(model, path)

  # A fused gate lives in the columns of the projection it shares; move it to its own row.
  position = config_lib.canonical_gate_position(model.gate.position)
  if model.gate.input_dependent and position in ('sdpa', 'query', 'key', 'value'):
    fused = gate_params_per_layer(model) * model.num_layers
    host = {'sdpa': 'attention q', 'query': 'attention q', 'key': 'attention k',
            'value': 'attention v'}[position]
    for key in ('params', 'active'):
      parts[host][key] -= fused
    parts['gate'] = {'params': fused, 'active': fused}

  total = sum(row['params'] for row in parts.values())
  return {
      'params_total': total,
      'params_active': round(sum(row['active'] for row in parts.values())),
      'params_gate': parts.get('gate', {}).get('params', 0),
      'flops_per_token': flops_lib.flops_per_token(model, config.data.seq_len, flat),
      'seq_len': config.data.seq_len,
      'parts': {name: {'params': row['params'], 'active': round(row['active'])}
                for name, row in parts.items()},
  }


def format_count(count: float) -> str:
  """A parameter count to three significant figures: '1.72B', '201M', '2.05K', '12'."""
  for scale, suffix in ((1e9, 'B'), (1e6, 'M'), (1e3, 'K')):
    if count >= scale:
      return f'{count / scale:.3g}{suffix}'
  return f'{count:.0f}'


def format_summary(summary: dict) -> str:
  """The summary as an aligned text table."""
  lines = [f'{"part":14} {"params":>16} {"active":>16}']
  for name, row in summary['parts'].items():
    lines.append(f'{name:14} {row["params"]:>16,} {row["active"]:>16,}')
  lines.append(f'{"total":14} {summary["params_total"]:>16,} {summary["params_active"]:>16,}')
  lines.append(f'({format_count(summary["params_total"])} total, '
               f'{format_count(summary["params_active"])} active, gate '
               f'{format_count(summary["params_gate"])})')
  lines.append(f'training FLOPs per token at seq_len {summary["seq_len"]}: '
               f'{summary["flops_per_token"]:.4g}')
  return '\n'.join(lines)
