"""Hugging Face checkpoints in and out: the formats, the one tensor table, reading and writing.

Formats (model_type in config.json):
  qwen3          Qwen3ForCausalLM: the ungated dense baseline.
  qwen3_moe      Qwen3MoeForCausalLM: the ungated mixture-of-experts baseline.
  qwen3_next     Qwen3NextForCausalLM with every layer full attention: the G1 elementwise sigmoid
                 gate in q_proj, per head [h0 query | h0 gate | h1 query | ...] (the project's
                 own fused layout), (1 + w) RMSNorms, partial RoPE, and either a dense MLP
                 (num_experts 0) or experts with a shared expert and its sigmoid gate.
  paper_release  the paper's released models (QwQZh/gated_attention): model_type qwen3 with
                 headwise_attn_output_gate or elementwise_attn_output_gate. Its q_proj rows are
                 grouped by KV head: for each KV group, the rows of that group's query heads,
                 then the rows of their gates.

The heart of the module is `tensor_table(model_config, format)`: one `Row` per external tensor,
naming the project parameter it fills (its path in the unrolled `blocks` layout), which slice
of it, and how the values map (transpose and reshape of a torch Linear weight, a permutation of
its rows, a norm-scale offset). Import (`to_project`) and export (`to_external`) read the same
rows, so they cannot drift apart, and a round trip is exact. The scanned `layers` layout holds
block i's parameters at index i of a leading axis (`state.convert_layers`); `located` places a
row there, so either layout is read and written one parameter at a time.

Tensors are read with the safetensors library's NumPy API, one at a time; a Hugging Face
config that the project cannot express (linear-attention layers, biases, sliding windows, RoPE
scaling other than linear and YaRN) is refused, naming the key and value, before any weight is
read. A config's rope_scaling (rope_type linear or yarn) maps to model.rope_scaling, and back.
"""

import json
import math
import os
import pathlib
import shutil
import sys
import time
from typing import NamedTuple

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx
from tqdm import tqdm

from gated_attention import checkpoint as checkpoint_lib
from gated_attention import config as config_lib
from gated_attention import sharding as sharding_lib
from gated_attention import state as state_lib
from gated_attention import tokenizer as tokenizer_lib
from gated_attention.config import ConfigError, canonical_gate_position
from gated_attention.model import mlp_width

FORMATS = ('qwen3', 'qwen3_moe', 'qwen3_next', 'paper_release')
ARCHITECTURES = {'qwen3': 'Qwen3ForCausalLM', 'qwen3_moe': 'Qwen3MoeForCausalLM',
                 'qwen3_next': 'Qwen3NextForCausalLM', 'paper_release': 'Qwen3ForCausalLM'}
_PLUS_ONE_NORMS = ('qwen3_next',)  # Formats whose RMSNorm scales by (1 + w).
_PAPER_GATE_FLAGS = {'elementwise': 'elementwise_attn_output_gate',
                     'headwise': 'headwise_attn_output_gate'}
# Tensors some checkpoints carry that no supported model reads (Qwen3-Next's multi-token
# prediction head), as transformers ignores them too.
_IGNORED_PREFIXES = ('mtp.',)
SAFETENSORS_INDEX = 'model.safetensors.index.json'


class Row(NamedTuple):
  """One external tensor <-> one slice of one project parameter.

  name:    the Hugging Face tensor name.
  path:    the project parameter's path in the unrolled layout ('blocks', i, ...).
  index:   the slice of that parameter the tensor fills (() for all of it).
  in_dims: 0: the same values in the same order (embeddings, norm scales); k > 0: a torch
           Linear weight [out, in] whose transpose is the slice, the slice's first k axes
           being the input (e.g. o_proj [d_model, heads * head_dim] <-> wo [heads, head_dim,
           d_model], k = 2).
  rows:    for a Linear, the external row of each project output unit in order (a
           permutation), or None when the orders agree.
  offset:  added on export, taken away on import: a norm scale w of one RMSNorm convention
           written in the other ((1 + w) against w).
  """
  name: str
  path: tuple
  index: tuple = ()
  in_dims: int = 0
  rows: np.ndarray | None = None
  offset: float = 0.0


def external_shape(row: Row, slice_shape: tuple) -> tuple:
  """The external tensor's shape for a project slice of `slice_shape`."""
  if not row.in_dims:
    return tuple(slice_shape)
  in_size = math.prod(slice_shape[:row.in_dims])
  return (math.prod(slice_shape) // in_size, in_size)


def to_project(row: Row, tensor: np.ndarray, slice_shape: tuple) -> np.ndarray:
  """The project slice (of `slice_shape`) that the external `tensor` holds."""
  if row.in_dims:
    tensor = (tensor if row.rows is None else tensor[row.rows]).T
  value = tensor.reshape(slice_shape)
  return _shifted(value, -row.offset)


def to_external(row: Row, value: np.ndarray) -> np.ndarray:
  """The external tensor for the project slice `value`: the inverse of to_project."""
  value = _shifted(value, row.offset)
  if not row.in_dims:
    return np.ascontiguousarray(value)
  matrix = value.reshape(external_shape(row, value.shape)[::-1]).T
  if row.rows is not None:
    unpermuted = np.empty_like(matrix)
    unpermuted[row.rows] = matrix
    matrix = unpermuted
  return np.ascontiguousarray(matrix)


def _shifted(value: np.ndarray, offset: float) -> np.ndarray:
  if not offset:
    return value
  return (value.astype(np.float32) + offset).astype(value.dtype)


def located(row: Row, scan_layers: bool) -> tuple[tuple, tuple]:
  """(path, index) of the row's slice in the given layer layout: block i of the unrolled
  layout is index i of the scanned layout's leading axis."""
  if scan_layers and row.path[0] == 'blocks':
    return ('layers', *row.path[2:]), (row.path[1], *row.index)
  return row.path, row.index


def _grouped_gate_rows(heads: int, kv_heads: int, head_dim: int, width: int) -> np.ndarray:
  """External q_proj row of each unit of the fused query kernel [heads, head_dim + width] in
  the paper release's layout: per KV group, the group's query rows, then its gate rows."""
  group = heads // kv_heads
  head = np.arange(heads)[:, None]
  column = np.arange(head_dim + width)[None, :]
  start = (head // group) * group * (head_dim + width)
  query = start + (head % group) * head_dim + column
  gate = start + group * head_dim + (head % group) * width + (column - head_dim)
  return np.where(column < head_dim, query, gate).reshape(-1)


def tensor_table(model, fmt: str) -> list[Row]:
  """Every external tensor of `fmt` for the project model config `model`, in the order of a
  Hugging Face checkpoint. The config must be exportable to fmt (`check_exportable`)."""
  norm = dict(offset=float(model.norm_plus_one) - float(fmt in _PLUS_ONE_NORMS))
  query_rows = None
  if fmt == 'paper_release':
    width = model.head_dim if model.gate.granularity == 'elementwise' else 1
    query_rows = _grouped_gate_rows(model.num_heads, model.num_kv_heads, model.head_dim, width)
  rows = [Row('model.embed_tokens.weight', ('embedding',))]
  for i in range(model.num_layers):
    name, block = f'model.layers.{i}.', ('blocks', i)
    rows += [
        Row(name + 'input_layernorm.weight', block + ('attention_norm', 'scale'), **norm),
        Row(name + 'self_attn.q_proj.weight', block + ('attention', 'wq'), in_dims=1,
            rows=query_rows),
        Row(name + 'self_attn.k_proj.weight', block + ('attention', 'wk'), in_dims=1),
        Row(name + 'self_attn.v_proj.weight', block + ('attention', 'wv'), in_dims=1),
        Row(name + 'self_attn.o_proj.weight', block + ('attention', 'wo'), in_dims=2),
        Row(name + 'post_attention_layernorm.weight', block + ('mlp_norm', 'scale'), **norm)]
    if model.qk_norm:
      rows += [Row(f'{name}self_attn.{q_or_k}_norm.weight',
                   block + ('attention', f'{q_or_k}_norm', 'scale'), **norm)
               for q_or_k in ('q', 'k')]
    mlp = block + ('mlp',)
    if model.moe.num_experts:
      rows.append(Row(name + 'mlp.gate.weight', mlp + ('router',), in_dims=1))
      for e in range(model.moe.num_experts):
        rows += _swiglu_rows(f'{name}mlp.experts.{e}.', mlp, (e,))
      if model.moe.shared_expert_dim:
        rows += _swiglu_rows(name + 'mlp.shared_expert.', mlp + ('shared_expert',), ())
        rows.append(Row(name + 'mlp.shared_expert_gate.weight', mlp + ('shared_expert_gate',),
                        in_dims=1))
    else:
      rows += _swiglu_rows(name + 'mlp.', mlp, ())
  rows.append(Row('model.norm.weight', ('final_norm', 'scale'), **norm))
  if not model.tie_embeddings:
    rows.append(Row('lm_head.weight', ('lm_head',), in_dims=1))
  return rows


def _swiglu_rows(name: str, path: tuple, expert: tuple) -> list[Row]:
  """gate_proj, up_proj and down_proj of one SwiGLU (wi [..., embed, 2, mlp] holds gate_proj
  at [:, 0] and up_proj at [:, 1]; wo [..., mlp, embed]); `expert` indexes an expert's."""
  return [Row(name + 'gate_proj.weight', path + ('wi',), (*expert, slice(None), 0), in_dims=1),
          Row(name + 'up_proj.weight', path + ('wi',), (*expert, slice(None), 1), in_dims=1),
          Row(name + 'down_proj.weight', path + ('wo',), expert, in_dims=1)]


# ---- configs ----------------------------------------------------------------------------------


def read_hf_config(hf_dir) -> dict:
  path = pathlib.Path(hf_dir) / 'config.json'
  if not path.exists():
    raise checkpoint_lib.CheckpointError(
        f'{path} does not exist: --hf_dir must be a Hugging Face model directory.')
  return _read_json_object(path)


def _read_json_object(path: pathlib.Path) -> dict:
  """The JSON object in `path`; CheckpointError naming the file when it holds anything else."""
  try:
    value = json.loads(path.read_text())
  except json.JSONDecodeError as error:
    raise checkpoint_lib.CheckpointError(f'{path} is not valid JSON ({error}).') from None
  if not isinstance(value, dict):
    raise checkpoint_lib.CheckpointError(f'{path} holds a JSON {type(value).__name__}, not an '
                                         'object of keys.')
  return value


def _refuse(key: str, value, accepted: str):
  raise ConfigError(f'config.json {key}={value!r} is not supported: {accepted}.')


def detect_format(hf: dict) -> str:
  """The format of a Hugging Face config (FORMATS), from model_type and the gate flags."""
  model_type = hf.get('model_type')
  if model_type == 'qwen3':
    flags = [flag for flag in _PAPER_GATE_FLAGS.values() if hf.get(flag)]
    if len(flags) > 1:
      _refuse(flags[1], True, f'{flags[0]} is also set; a model has one gate granularity')
    return 'paper_release' if flags else 'qwen3'
  if model_type in ('qwen3_moe', 'qwen3_next'):
    return model_type
  _refuse('model_type', model_type, 'the supported types are qwen3 (with or without the '
          "paper's gate flags), qwen3_moe and qwen3_next")


# Hugging Face rope_type -> model.rope_scaling.type; the keys below map one to one.
_ROPE_TYPES = {'default': 'none', 'linear': 'linear', 'yarn': 'yarn'}
# model.rope_scaling key -> Hugging Face rope parameter (config.ROPE_SCALING_KEYS says which
# keys each type reads).
_ROPE_PARAMETERS = {'factor': 'factor', 'original_max_position': 'original_max_position_embeddings',
                    'beta_fast': 'beta_fast', 'beta_slow': 'beta_slow',
                    'attention_factor': 'attention_factor', 'mscale': 'mscale',
                    'mscale_all_dim': 'mscale_all_dim', 'truncate': 'truncate'}


def _rope(hf: dict, fmt: str) -> tuple[float, float, ml_collections.ConfigDict]:
  """(rope_theta, partial rotary fraction, model.rope_scaling) from rope_parameters
  (transformers 5) or the older top-level rope_theta, partial_rotary_factor and rope_scaling
  keys. A YaRN config without original_max_position_embeddings reads it as transformers
  does (max_position_embeddings); one without a factor is refused, as transformers refuses it."""
  key = 'rope_parameters' if hf.get('rope_parameters') is not None else 'rope_scaling'
  rope = dict(hf.get(key) or {})
  if 'full_attention' in rope:  # Nested per layer type; every layer is full attention here.
    key, rope = f'{key}.full_attention', dict(rope['full_attention'] or {})
  rope_type = rope.get('rope_type', rope.get('type')) or 'default'
  if rope_type not in _ROPE_TYPES:
    _refuse(f'{key}.rope_type', rope_type, f'the RoPE types implemented are {list(_ROPE_TYPES)}')
  scaling = config_lib.rope_scaling_config()  # Keys it leaves out: transformers' defaults.
  scaling.type = _ROPE_TYPES[rope_type]
  if rope_type != 'default' and rope.get('factor') is None:
    _refuse(f'{key}.factor', None, f'rope_type {rope_type!r} needs a factor')
  if rope_type == 'yarn':
    rope.setdefault('original_max_position_embeddings', hf.get(
        'original_max_position_embeddings') or _required(hf, 'max_position_embeddings'))
  for ours in config_lib.ROPE_SCALING_KEYS[scaling.type]:
    theirs = _ROPE_PARAMETERS[ours]
    if rope.get(theirs) is not None:  # Absent or null: the project's default, as theirs.
      scaling[ours] = type(scaling[ours])(rope[theirs])
  theta = float(rope.get('rope_theta', hf.get('rope_theta', 10_000.0)))
  fraction = float(rope.get('partial_rotary_factor', hf.get(
      'partial_rotary_factor', 0.25 if fmt == 'qwen3_next' else 1.0)))
  if fmt != 'qwen3_next' and fraction != 1.0:
    _refuse('partial_rotary_factor', fraction, f'{fmt} rotates the whole head_dim')
  return theta, fraction, scaling


def _rope_parameters(model) -> dict:
  """The Hugging Face rope parameters of model.rope_scaling (the inverse of `_rope`)."""
  scaling = model.rope_scaling
  rope = {'rope_type': {ours: theirs for theirs, ours in _ROPE_TYPES.items()}[scaling.type]}
  rope.update({_ROPE_PARAMETERS[ours]: scaling[ours]
               for ours in config_lib.ROPE_SCALING_KEYS[scaling.type]})
  if scaling.type == 'yarn' and not scaling.attention_factor:
    rope['attention_factor'] = None  # 0 here means: derived from factor and mscale, as theirs.
  return rope


def _check_importable(hf: dict, fmt: str) -> None:
  """Refuses what the project cannot express, naming the key and value."""
  for key in ('attention_bias', 'qkv_bias', 'mlp_bias', 'use_sliding_window'):
    if hf.get(key):
      _refuse(key, hf[key], 'the project has no biases and no sliding-window attention')
  if hf.get('hidden_act', 'silu') != 'silu':
    _refuse('hidden_act', hf['hidden_act'], "only 'silu' (SwiGLU) is implemented")
  for i, layer_type in enumerate(hf.get('layer_types') or ()):
    if layer_type != 'full_attention':
      _refuse(f'layer_types[{i}]', layer_type, "every layer must be 'full_attention'")
  if _num_experts(hf):
    if hf.get('mlp_only_layers'):
      _refuse('mlp_only_layers', hf['mlp_only_layers'], 'every layer must be a MoE layer')
    if hf.get('decoder_sparse_step', 1) != 1:
      _refuse('decoder_sparse_step', hf['decoder_sparse_step'], 'every layer must be a MoE '
              'layer (decoder_sparse_step 1)')
  dtype = _dtype(hf)
  if dtype not in config_lib.DTYPES:
    _refuse('dtype', dtype, f'parameters must be one of {list(config_lib.DTYPES)}')


def _required(hf: dict, key: str):
  if key not in hf:
    raise ConfigError(f'config.json has no {key}; a model config written by transformers has.')
  return hf[key]


def _num_experts(hf: dict) -> int:
  return int(hf.get('num_experts', hf.get('num_local_experts', 0)) or 0)


def _dtype(hf: dict) -> str:
  return hf.get('dtype') or hf.get('torch_dtype') or 'float32'


def _at_key(config: ml_collections.ConfigDict, key: str):
  """config['a.b'] as config.a.b (None where the config has no such key)."""
  for part in key.split('.'):
    if not isinstance(config, ml_collections.ConfigDict) or part not in config:
      return None
    config = config[part]
  return config.to_dict() if isinstance(config, ml_collections.ConfigDict) else config


def model_config_from_hf(hf: dict, base_model) -> tuple[ml_collections.ConfigDict, str]:
  """(project model config, format) for a Hugging Face config: its architecture over
  `base_model`'s other keys (attention_impl, dtype, scan_layers, remat, MoE dispatch, the router
  z-loss weight, and the load-balance weight where the checkpoint names none). An MoE comes
  dropless (capacity_factor 0), as transformers runs it. Raises ConfigError for what the
  project cannot express."""
  fmt = detect_format(hf)
  _check_importable(hf, fmt)
  rope_theta, rope_fraction, rope_scaling = _rope(hf, fmt)
  heads, d_model = _required(hf, 'num_attention_heads'), _required(hf, 'hidden_size')
  gate = 'none'
  if fmt == 'qwen3_next':
    gate = 'g1_elementwise'
  elif fmt == 'paper_release':
    gate = next(f'g1_{granularity}' for granularity, flag in _PAPER_GATE_FLAGS.items()
                if hf.get(flag))
  model = ml_collections.ConfigDict(base_model.to_dict())
  model.update(
      vocab_size=_required(hf, 'vocab_size'), d_model=d_model,
      num_layers=_required(hf, 'num_hidden_layers'), num_heads=heads,
      num_kv_heads=hf.get('num_key_value_heads') or heads,
      head_dim=hf.get('head_dim') or d_model // heads,
      mlp_dim=_required(hf, 'intermediate_size'), norm_eps=hf.get('rms_norm_eps', 1e-6),
      norm_plus_one=fmt in _PLUS_ONE_NORMS, tie_embeddings=bool(hf.get('tie_word_embeddings')),
      qk_norm=bool(hf.get('use_qk_norm', True)), rope_theta=rope_theta,
      rope_fraction=rope_fraction, sandwich_norm=False, match_baseline_params=False,
      init_std=hf.get('initializer_range', base_model.init_std), param_dtype=_dtype(hf))
  model.gate = config_lib.gate_config(gate)
  model.rope_scaling = rope_scaling
  experts = _num_experts(hf)
  model.moe.update(num_experts=experts)
  if experts:
    top_k = _required(hf, 'num_experts_per_tok')
    model.moe.update(top_k=top_k, capacity_factor=0.0,
                     load_balance_weight=_load_balance_weight(hf, top_k, base_model),
                     expert_mlp_dim=_required(hf, 'moe_intermediate_size'),
                     normalize_top_k=bool(hf.get('norm_topk_prob', fmt == 'qwen3_next')),
                     shared_expert_dim=hf.get('shared_expert_intermediate_size', 0)
                     if fmt == 'qwen3_next' else 0)
  return model, fmt


def _load_balance_weight(hf: dict, top_k: int, base_model) -> float:
  """model.moe.load_balance_weight from router_aux_loss_coef: transformers' load-balance loss
  sums over the top_k choices, so on one layer it is top_k times `moe.load_balance_loss` (1 for
  a uniform router); the export divides by top_k. Over several layers the two differ in form,
  not scale: transformers pools every layer's routing counts and probabilities before taking
  E * sum f P, the project takes it per layer and averages (equal when the layers route alike)."""
  coefficient = hf.get('router_aux_loss_coef')
  return base_model.moe.load_balance_weight if coefficient is None else coefficient * top_k


def export_format(model, requested: str = 'auto') -> str:
  """The format to write: `requested`, or for 'auto' the native transformers type of the
  variant (an ungated model: qwen3 or qwen3_moe; G1 elementwise: qwen3_next; G1 headwise, which
  only the paper's release expresses: paper_release)."""
  if requested != 'auto':
    if requested not in FORMATS:
      raise ConfigError(f'--format={requested!r} is not a format; choose one of '
                        f"{['auto', *FORMATS]}.")
    check_exportable(model, requested)
    return requested
  position = canonical_gate_position(model.gate.position)
  if position == 'none':
    fmt = 'qwen3_moe' if model.moe.num_experts else 'qwen3'
  elif position == 'sdpa' and model.gate.granularity == 'headwise':
    fmt = 'paper_release'
  else:
    fmt = 'qwen3_next'
  check_exportable(model, fmt)
  return fmt


def check_exportable(model, fmt: str) -> None:
  """Raises ConfigError naming the first config key whose value format fmt cannot hold."""
  gate, moe = model.gate, model.moe
  position = canonical_gate_position(gate.position)
  gated, dense = position != 'none', moe.num_experts == 0
  needs = [  # (key, value, whether fmt holds it, what fmt needs)
      ('model.sandwich_norm', model.sandwich_norm, not model.sandwich_norm, 'False'),
      ('model.gate.sdpa_nonlinearity', gate.sdpa_nonlinearity, gate.sdpa_nonlinearity == 'none',
       "'none'"),
      ('model.gate.position', gate.position, position in ('none', 'sdpa'),
       "'none' or 'sdpa' (G1)")]
  if gated:
    needs += [
        ('model.gate.activation', gate.activation, gate.activation == 'sigmoid', "'sigmoid'"),
        ('model.gate.mode', gate.mode, gate.mode == 'multiplicative', "'multiplicative'"),
        ('model.gate.head_shared', gate.head_shared, not gate.head_shared, 'False'),
        ('model.gate.input_dependent', gate.input_dependent, gate.input_dependent, 'True')]
  if fmt in ('qwen3', 'qwen3_moe'):
    needs += [('model.gate.position', gate.position, not gated, "'none' (no gate)")]
  if fmt in ('qwen3', 'qwen3_moe', 'paper_release'):
    needs += [('model.rope_fraction', model.rope_fraction, model.rope_fraction == 1.0, '1.0')]
  if fmt != 'paper_release':
    needs += [('model.qk_norm', model.qk_norm, model.qk_norm, 'True')]
  if fmt in ('qwen3', 'paper_release'):
    needs += [('model.moe.num_experts', moe.num_experts, dense, '0 (a dense MLP)')]
  if fmt == 'qwen3_moe':
    needs += [('model.moe.num_experts', moe.num_experts, not dense, '> 0'),
              ('model.moe.shared_expert_dim', moe.shared_expert_dim, moe.shared_expert_dim == 0,
               '0 (no shared expert)')]
  if fmt == 'paper_release':
    needs += [('model.gate.position', gate.position, gated, "'sdpa' (G1)")]
  if fmt == 'qwen3_next':
    needs += [('model.gate.position', gate.position, gated, "'sdpa' (G1)"),
              ('model.gate.granularity', gate.granularity, gate.granularity == 'elementwise',
               "'elementwise'"),
              ('model.moe.shared_expert_dim', moe.shared_expert_dim,
               dense or moe.shared_expert_dim > 0, '> 0 (its MoE layers have a shared expert)')]
  for key, value, holds, wanted in needs:
    if not holds:
      raise ConfigError(f'{key}={value!r}: the {fmt} format cannot hold this model (it needs '
                        f'{wanted}); formats: qwen3 (no gate), qwen3_moe (no gate, experts), '
                        'qwen3_next (G1 elementwise), paper_release (G1, dense).')


def hf_config(config, fmt: str, max_position_embeddings: int) -> dict:
  """The config.json transformers reads for the project config in format fmt."""
  model, moe = config.model, config.model.moe
  hf = {
      'architectures': [ARCHITECTURES[fmt]],
      'model_type': 'qwen3' if fmt == 'paper_release' else fmt,
      'vocab_size': model.vocab_size, 'hidden_size': model.d_model,
      'intermediate_size': mlp_width(model), 'num_hidden_layers': model.num_layers,
      'num_attention_heads': model.num_heads, 'num_key_value_heads': model.num_kv_heads,
      'head_dim': model.head_dim, 'hidden_act': 'silu', 'rms_norm_eps': model.norm_eps,
      'tie_word_embeddings': model.tie_embeddings, 'attention_bias': False,
      'max_position_embeddings': max_position_embeddings,
      'initializer_range': model.init_std, 'dtype': model.param_dtype,
  }
  rope = {**_rope_parameters(model), 'rope_theta': model.rope_theta}
  if fmt == 'paper_release':  # Its configuration class reads the older top-level keys.
    scaling = {key: value for key, value in rope.items() if key != 'rope_theta'}
    hf.update(rope_theta=model.rope_theta,
              rope_scaling=None if model.rope_scaling.type == 'none' else scaling,
              use_qk_norm=model.qk_norm,
              qkv_bias=False, use_sliding_window=False,
              **{flag: model.gate.granularity == granularity
                 for granularity, flag in _PAPER_GATE_FLAGS.items()})
  else:
    if fmt == 'qwen3_next':
      rope['partial_rotary_factor'] = model.rope_fraction
      hf['layer_types'] = ['full_attention'] * model.num_layers
    hf['rope_parameters'] = rope
  if fmt in ('qwen3_moe', 'qwen3_next'):
    hf.update(num_experts=moe.num_experts, decoder_sparse_step=1, mlp_only_layers=[])
  if moe.num_experts:
    hf.update(num_experts_per_tok=moe.top_k, moe_intermediate_size=moe.expert_mlp_dim,
              norm_topk_prob=moe.normalize_top_k,
              router_aux_loss_coef=moe.load_balance_weight / moe.top_k)  # _load_balance_weight.
    if fmt == 'qwen3_next':
      hf['shared_expert_intermediate_size'] = moe.shared_expert_dim
  tokenizer = tokenizer_lib.load_tokenizer(config.data.tokenizer)
  if tokenizer is not None:
    hf.update(bos_token_id=tokenizer.bos_id, eos_token_id=tokenizer.eos_id,
              pad_token_id=tokenizer.pad_id)
  return hf


# ---- tensors ----------------------------------------------------------------------------------


class SafetensorsReader:
  """The tensors of a Hugging Face model directory, found as transformers finds them:
  model.safetensors, else the shards model.safetensors.index.json lists, else every
  *.safetensors file; read one at a time with safetensors' NumPy API."""

  def __init__(self, hf_dir):
    from safetensors import safe_open  # Only where checkpoints are read.
    directory = pathlib.Path(hf_dir)
    index = directory / SAFETENSORS_INDEX
    if (directory / 'model.safetensors').exists():
      files = [directory / 'model.safetensors']
    elif index.exists():
      weight_map = _read_json_object(index).get('weight_map')
      if not isinstance(weight_map, dict):
        raise checkpoint_lib.CheckpointError(f'{index} has no weight_map of tensor names to '
                                             'files.')
      files = sorted({directory / file for file in weight_map.values()})
    else:
      files = sorted(directory.glob('*.safetensors'))
    if not files:
      raise checkpoint_lib.CheckpointError(f'{directory} holds no *.safetensors file.')
    self.files, self.bytes_read = {}, 0
    for path in files:
      try:
        handle = safe_open(str(path), framework='np')
      except Exception as error:  # The Rust library raises its own error types.
        raise checkpoint_lib.CheckpointError(
            f'{path}: cannot read it as safetensors ({error}).') from None
      self.files.update({name: handle for name in handle.keys()})

  def shape(self, name: str) -> tuple:
    return tuple(self.files[name].get_slice(name).get_shape())

  def get(self, name: str) -> np.ndarray:
    tensor = self.files[name].get_tensor(name)
    self.bytes_read += tensor.nbytes
    return tensor


def _slice_shape(shape, index) -> tuple:
  return np.broadcast_to(np.empty((), np.int8), shape)[index].shape


def check_tensors(reader: SafetensorsReader, by_leaf: dict, abstract_params: dict) -> None:
  """Every tensor the table names (`_rows_by_leaf`) is present with the shape its slice of
  abstract_params implies, and nothing else is: headers only, no weight is read."""
  expected = {row.name for pairs in by_leaf.values() for row, _ in pairs}
  present = {name for name in reader.files if not name.startswith(_IGNORED_PREFIXES)}
  if 'lm_head.weight' not in expected:
    present.discard('lm_head.weight')  # Tied checkpoints may still store the tied copy.
  missing, unexpected = sorted(expected - present), sorted(present - expected)
  if missing:
    raise checkpoint_lib.CheckpointError(
        f'tensor {missing[0]} is missing from the checkpoint ({len(missing)} missing); is '
        'config.json the one written with these weights?')
  if unexpected:
    raise checkpoint_lib.CheckpointError(
        f'tensor {unexpected[0]} ({len(unexpected)} unexpected) has no place in the model that '
        'config.json describes (biases and other extra weights are not supported).')
  for path, pairs in by_leaf.items():
    for row, index in pairs:
      want = external_shape(row, _slice_shape(_leaf(abstract_params, path).shape, index))
      if reader.shape(row.name) != want:
        raise checkpoint_lib.CheckpointError(
            f'tensor {row.name} has shape {list(reader.shape(row.name))}; config.json implies '
            f'{list(want)}.')


def _leaf(tree: dict, path: tuple):
  for key in path:
    tree = tree[key]
  return tree


def _rows_by_leaf(rows: list[Row], scan_layers: bool) -> dict:
  """{leaf path in the given layout: [(row, index within the leaf)]}."""
  by_leaf: dict = {}
  for row in rows:
    path, index = located(row, scan_layers)
    by_leaf.setdefault(path, []).append((row, index))
  return by_leaf


def _keys(key_path) -> tuple:
  return tuple(key.key for key in key_path)


def import_hf(hf_dir, workdir, config, mesh_config=None, param_dtype: str | None = None,
              model_overrides: tuple[str, ...] = ()) -> dict:
  """Converts the Hugging Face model in hf_dir into a project workdir: WORKDIR/config.json
  (`config` with the model's architecture and its tokenizer, copied into WORKDIR/tokenizer)
  and a parameters-only orbax checkpoint at step 0, each parameter placed on the mesh
  (mesh_config, default config.mesh) as it is read. model_overrides: keys of config.model the
  user set (such as 'num_layers', 'moe.impl'); one the checkpoint's architecture replaces is a
  ConfigError, not dropped. Returns a summary."""
  hf_dir, workdir = pathlib.Path(hf_dir), pathlib.Path(workdir)
  hf = read_hf_config(hf_dir)
  config = ml_collections.ConfigDict(config.to_dict())
  base_model = config.model
  config.model, fmt = model_config_from_hf(hf, base_model)
  for key in model_overrides:
    given, imported = _at_key(base_model, key), _at_key(config.model, key)
    if given != imported:
      raise config_lib.ConfigError(
          f'--config.model.{key}={given!r}: the architecture comes from {hf_dir}/config.json, '
          f'which gives {imported!r}' + {
              'param_dtype': '; use --param_dtype to store the parameters in another dtype.',
              'moe.capacity_factor': ' (dropless, as transformers runs it); train with '
                                     'another through train.init_from.'}.get(key, '.'))
  if param_dtype:
    config.model.param_dtype = param_dtype
  tokenizer_json = hf_dir / 'tokenizer.json'
  config.data.tokenizer = str(tokenizer_json) if tokenizer_json.exists() else tokenizer_lib.NONE
  config_lib.validate(config)
  if any((workdir / 'checkpoints').glob('[0-9]*')):
    raise checkpoint_lib.CheckpointError(f'{workdir} already holds checkpoints; import into a '
                                         'new --workdir.')
  reader = SafetensorsReader(hf_dir)
  rows = tensor_table(config.model, fmt)
  mesh = sharding_lib.make_mesh(config.mesh if mesh_config is None else mesh_config)
  _, abstract_variables = state_lib.abstract_model(config.model)
  abstract_params = nnx.to_pure_dict(abstract_variables)
  by_leaf = _rows_by_leaf(rows, config.model.scan_layers)
  check_tensors(reader, by_leaf, abstract_params)

  shardings = state_lib.param_shardings(mesh, abstract_variables)
  started = time.perf_counter()
  progress = tqdm(total=len(by_leaf), desc='import', unit='tensor', file=sys.stdout,
                  disable=jax.process_index() != 0)

  def convert(key_path, abstract):
    path = _keys(key_path)
    host = np.empty(abstract.shape, abstract.dtype)
    for row, index in by_leaf[path]:
      host[index] = to_project(row, reader.get(row.name), host[index].shape)
    progress.update(1)
    progress.set_postfix(MB_s=f'{reader.bytes_read / 2**20 / (time.perf_counter() - started):.0f}')
    return jax.make_array_from_callback(host.shape, _leaf(shardings, path),
                                        lambda index: host[index])

  params = jax.tree_util.tree_map_with_path(convert, abstract_params)
  progress.close()
  if tokenizer_json.exists():
    config.data.tokenizer = str((workdir / 'tokenizer' / 'tokenizer.json').absolute())
    if jax.process_index() == 0:
      _copy_tokenizer(tokenizer_json, workdir / 'tokenizer')
  if jax.process_index() == 0:  # Before the checkpoint: a checkpoint always has its config.
    workdir.mkdir(parents=True, exist_ok=True)
    checkpoint_lib.save_config(workdir, config)
  checkpointer = checkpoint_lib.Checkpointer(workdir)
  checkpointer.save_params(0, params, {'imported_from': str(hf_dir.absolute()), 'format': fmt},
                           config)
  checkpointer.wait()
  checkpointer.close()
  seconds = time.perf_counter() - started  # Reading, converting, placing and writing.
  return {'format': fmt, 'tensors': len(rows),
          'parameters': state_lib.num_params(abstract_variables), 'bytes': reader.bytes_read,
          'seconds': seconds, 'tokenizer': config.data.tokenizer}


def _copy_tokenizer(tokenizer_json: pathlib.Path, directory: pathlib.Path) -> None:
  """Copies a tokenizer.json, and the tokenizer_config.json beside it if any, into directory."""
  directory.mkdir(parents=True, exist_ok=True)
  shutil.copyfile(tokenizer_json, directory / 'tokenizer.json')
  if (tokenizer_json.parent / 'tokenizer_config.json').exists():
    shutil.copyfile(tokenizer_json.parent / 'tokenizer_config.json',
                    directory / 'tokenizer_config.json')


def export_hf(workdir, out_dir, step: int | None = None, fmt: str = 'auto',
              max_shard_bytes: int = 2 * 2**30, max_position_embeddings: int | None = None
              ) -> dict | None:
  """Writes checkpoint `step` (default: the latest) of workdir as a Hugging Face model
  directory: config.json, safetensors shards of at most max_shard_bytes (with
  model.safetensors.index.json when there are several) and the tokenizer.
  Host memory holds one parameter and one shard at a time. transformers' MoE layers are
  dropless: a model trained with model.moe.capacity_factor > 0 runs there as its dropless
  version. Returns a summary; with several processes, each reads the checkpoint onto its own
  devices, process 0 writes and returns the summary, the others return None."""
  from safetensors.numpy import save_file  # Only where checkpoints are written.
  from gated_attention.evaluate import restore_run
  out_dir = pathlib.Path(out_dir)
  if (out_dir / 'checkpoints').is_dir():
    raise config_lib.ConfigError(f'--out={out_dir} holds a training run (checkpoints/), whose '
                                 'config.json the export would overwrite: export to a '
                                 'directory of its own.')
  # Each process reads the whole checkpoint onto its own devices; process 0 writes the files.
  config, _, _, params, step = restore_run(
      workdir, step, dict(data=1, fsdp=-1, tensor=1, expert=1), jax.local_devices(),
      check_eval_batch=False, check=lambda config: export_format(config.model, fmt))
  fmt = export_format(config.model, fmt)
  if jax.process_index() != 0:
    return None
  by_leaf = _rows_by_leaf(tensor_table(config.model, fmt), config.model.scan_layers)
  itemsize = jnp.dtype(config.model.param_dtype).itemsize
  order = [(path, row, index) for path, leaf_rows in by_leaf.items() for row, index in leaf_rows]
  sizes = [math.prod(external_shape(row, _slice_shape(_leaf(params, path).shape, index)))
           * itemsize for path, row, index in order]
  files = _shard_files(sizes, max_shard_bytes)
  out_dir.mkdir(parents=True, exist_ok=True)
  # An earlier export's weights would be read in place of these (as transformers' own
  # save_pretrained does, they go).
  for stale in [*out_dir.glob('model*.safetensors'), out_dir / SAFETENSORS_INDEX]:
    stale.unlink(missing_ok=True)

  umask = os.umask(0o22)
  os.umask(umask)
  readable = 0o666 & ~umask  # What a file written the usual way gets.
  started, pending, host_path, host = time.perf_counter(), {}, None, None
  for position, (path, row, index) in enumerate(tqdm(order, desc='export', unit='tensor',
                                                     file=sys.stdout)):
    if path != host_path:  # Rows of one parameter are consecutive: fetch it once.
      host_path, host = path, np.asarray(_leaf(params, path))
    pending[row.name] = to_external(row, host[index])
    if position + 1 == len(order) or files[position + 1] != files[position]:
      save_file(pending, str(out_dir / files[position]), metadata={'format': 'pt'})
      os.chmod(out_dir / files[position], readable)  # safetensors writes it owner-only.
      pending = {}
  seconds = time.perf_counter() - started
  if len(set(files)) > 1:
    checkpoint_lib.write_whole(out_dir / SAFETENSORS_INDEX, json.dumps({
        'metadata': {'total_size': sum(sizes)},
        'weight_map': {row.name: file for (_, row, _), file in zip(order, files)}}, indent=2))
  if max_position_embeddings is None:
    max_position_embeddings = config_lib.trained_context(config)
  hf = hf_config(config, fmt, max_position_embeddings)
  checkpoint_lib.write_whole(out_dir / 'config.json', json.dumps(hf, indent=2))
  _write_tokenizer(config.data.tokenizer, out_dir)
  return {'format': fmt, 'step': step, 'tensors': len(order), 'files': len(set(files)),
          'bytes': sum(sizes), 'seconds': seconds}


def _shard_files(sizes: list[int], max_bytes: int) -> list[str]:
  """The file of each tensor, in order: a new shard starts where the next tensor would take
  the current one past max_bytes; names as transformers writes them."""
  shard, total, numbers = 0, 0, []
  for size in sizes:
    if total and total + size > max_bytes:
      shard, total = shard + 1, 0
    total += size
    numbers.append(shard)
  count = shard + 1
  if count == 1:
    return ['model.safetensors'] * len(sizes)
  return [f'model-{n + 1:05d}-of-{count:05d}.safetensors' for n in numbers]


def _write_tokenizer(name: str, out_dir: pathlib.Path) -> None:
  """The workdir's tokenizer in Hugging Face files: the byte tokenizer written out, a
  tokenizer.json copied with the tokenizer_config.json beside it."""
  if name == tokenizer_lib.BYTE:
    tokenizer_lib.save_byte_tokenizer(out_dir)
  elif name != tokenizer_lib.NONE:
    _copy_tokenizer(pathlib.Path(name), out_dir)
