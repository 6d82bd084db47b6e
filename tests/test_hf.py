"""Hugging Face checkpoints against transformers itself (float32, tiny random models): imported
models compute transformers' logits and greedy continuations, exports load natively and compute
ours, round trips are exact, and what no format expresses is refused by name.

The paper's release needs its own modeling code; `PaperReleaseAttention` below is an independent
reference written from PAPER.md (q_proj rows grouped per KV group), patched into transformers'
Qwen3 in place of its attention."""

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from safetensors import torch as safetensors_torch
from safetensors.numpy import load_file, save_file
from transformers import (AutoModelForCausalLM, AutoTokenizer, Qwen3Config, Qwen3ForCausalLM,
                          Qwen3MoeConfig, Qwen3MoeForCausalLM, Qwen3NextConfig,
                          Qwen3NextForCausalLM)
from transformers.models.qwen3 import modeling_qwen3
from transformers.models.qwen3_moe.modeling_qwen3_moe import load_balancing_loss_func

from gated_attention import checkpoint as checkpoint_lib
from gated_attention import config as config_lib
from gated_attention import hf
from gated_attention.checkpoint import CheckpointError
from gated_attention.config import ConfigError
from gated_attention.evaluate import load_params
from gated_attention.generate import Generator
from gated_attention.model import apply
from gated_attention.moe import load_balance_loss, route
from gated_attention.tokenizer import save_byte_tokenizer
from tests import helpers

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHAPES = dict(vocab_size=300, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
              num_attention_heads=4, num_key_value_heads=2, head_dim=8)
TOLERANCE = 1e-4
TOKENS = np.random.default_rng(0).integers(0, 300, (2, 12))
PROMPTS = [[257, 11, 12, 13, 14, 15], [257, 40, 41]]


class PaperReleaseAttention(modeling_qwen3.Qwen3Attention):
  """The paper release's gated attention: q_proj gains num_heads * width rows (width head_dim
  for elementwise, 1 for headwise), ordered per KV group as [the group's query rows | the
  group's gate rows]; the SDPA output of each head is multiplied by sigmoid(gate)."""

  def __init__(self, config, layer_idx):
    super().__init__(config, layer_idx)
    self.width = self.head_dim if getattr(config, 'elementwise_attn_output_gate', False) else 1
    self.q_proj = torch.nn.Linear(config.hidden_size, config.num_attention_heads * (
        self.head_dim + self.width), bias=False)

  def forward(self, hidden_states, position_embeddings, attention_mask, cache=None, **kwargs):
    batch, length, _ = hidden_states.shape
    kv_heads = self.config.num_key_value_heads
    group = self.config.num_attention_heads // kv_heads
    grouped = self.q_proj(hidden_states).view(batch, length, kv_heads, -1)
    query, gate = grouped.split([group * self.head_dim, group * self.width], dim=-1)
    query = query.reshape(batch, length, -1, self.head_dim)
    gate = gate.reshape(batch, length, -1, self.width)
    query = self.q_norm(query).transpose(1, 2)
    key = self.k_norm(self.k_proj(hidden_states).view(batch, length, -1, self.head_dim))
    key = key.transpose(1, 2)
    value = self.v_proj(hidden_states).view(batch, length, -1, self.head_dim).transpose(1, 2)
    query, key = modeling_qwen3.apply_rotary_pos_emb(query, key, *position_embeddings)
    if cache is not None:
      key, value = cache.update(key, value, self.layer_idx)
    attend = modeling_qwen3.ALL_ATTENTION_FUNCTIONS.get_interface(
        self.config._attn_implementation, modeling_qwen3.eager_attention_forward)
    out, weights = attend(self, query, key, value, attention_mask, dropout=0.0,
                          scaling=self.scaling, **kwargs)
    out = out * torch.sigmoid(gate)  # out: [batch, length, heads, head_dim].
    return self.o_proj(out.reshape(batch, length, -1)), weights


def _paper_release_code(monkeypatch) -> None:
  """From here on in the test, transformers' Qwen3 builds PaperReleaseAttention."""
  monkeypatch.setattr(modeling_qwen3, 'Qwen3Attention', PaperReleaseAttention)


_NEXT = dict(layer_types=['full_attention'] * 2)
_EXPERTS = dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=16)
KINDS = {  # name: (config class, model class, config keys, format)
    'qwen3': (Qwen3Config, Qwen3ForCausalLM, dict(tie_word_embeddings=True), 'qwen3'),
    'paper_elementwise': (Qwen3Config, Qwen3ForCausalLM, dict(elementwise_attn_output_gate=True),
                          'paper_release'),
    'paper_headwise': (Qwen3Config, Qwen3ForCausalLM, dict(headwise_attn_output_gate=True,
                                                           tie_word_embeddings=True),
                       'paper_release'),
    'qwen3_moe': (Qwen3MoeConfig, Qwen3MoeForCausalLM, dict(_EXPERTS, norm_topk_prob=False),
                  'qwen3_moe'),
    'qwen3_next': (Qwen3NextConfig, Qwen3NextForCausalLM, dict(
        _NEXT, **_EXPERTS, shared_expert_intermediate_size=24), 'qwen3_next'),
    'qwen3_yarn': (Qwen3Config, Qwen3ForCausalLM, dict(rope_parameters=dict(
        rope_type='yarn', rope_theta=500.0, factor=4.0, original_max_position_embeddings=8,
        beta_fast=4.0, beta_slow=1.0)), 'qwen3'),
    'qwen3_next_dense': (Qwen3NextConfig, Qwen3NextForCausalLM, dict(
        _NEXT, num_experts=0, rope_parameters=dict(rope_type='default', rope_theta=500.0,
                                                   partial_rotary_factor=0.5)), 'qwen3_next'),
}


def _randomize(model, plus_one: bool) -> None:
  """Every weight normal(0, 0.2); norm scales normal around their identity (1, or 0 for the
  (1 + w) norms), so a wrong layout or offset shows in the logits."""
  generator = torch.Generator().manual_seed(0)
  with torch.no_grad():
    for name, parameter in model.named_parameters():
      mean = (0.0 if plus_one else 1.0) if name.endswith('norm.weight') else 0.0
      parameter.copy_(mean + 0.2 * torch.randn(parameter.shape, generator=generator))


def _hf_model_dir(kind: str, directory, dtype=torch.float32):
  """A tiny random transformers model of `kind`, saved in `dtype` with the byte tokenizer."""
  config_class, model_class, keys, _ = KINDS[kind]
  model = model_class(config_class(**SHAPES, **keys))
  _randomize(model, plus_one=config_class is Qwen3NextConfig)
  model = model.to(dtype)
  model.save_pretrained(directory)
  save_byte_tokenizer(directory)
  return model.eval()


def _base_config(**model):
  config = config_lib.base_config('tiny', 'none')
  config.model.update({'attention_impl': 'xla', **model})
  return config


def _our_logits(workdir):
  config = checkpoint_lib.load_config(workdir)
  graphdef, params = _load(workdir, config)
  return np.asarray(apply(graphdef, params, TOKENS).logits), config, graphdef, params


def _load(workdir, config):
  graphdef, params, _ = load_params(workdir, config, helpers.one_device_mesh())
  return graphdef, params


def _torch_logits(model):
  with torch.no_grad():
    return model(torch.tensor(TOKENS)).logits.numpy()


def _tensors(directory) -> dict:
  tensors = {}
  for path in sorted(directory.glob('*.safetensors')):
    tensors.update(load_file(path))
  return tensors


@pytest.mark.parametrize('kind, scan', [('qwen3', False), ('qwen3_yarn', True),
                                        ('paper_elementwise', True),
                                        ('paper_headwise', False), ('qwen3_moe', True),
                                        ('qwen3_next', False), ('qwen3_next_dense', True)])
def test_imported_models_compute_transformers_logits_and_export_back_exactly(
    kind, scan, tmp_path, monkeypatch):
  if KINDS[kind][3] == 'paper_release':
    _paper_release_code(monkeypatch)
  torch_model = _hf_model_dir(kind, tmp_path / 'hf')
  base = _base_config(scan_layers=scan)
  base.model.moe.capacity_factor = 1.25  # Not the import's: an MoE comes dropless, as in torch.
  summary = hf.import_hf(tmp_path / 'hf', tmp_path / 'run', base)
  assert summary['format'] == KINDS[kind][3]
  ours, config, _, _ = _our_logits(tmp_path / 'run')
  difference = np.abs(ours - _torch_logits(torch_model)).max()
  assert difference <= TOLERANCE, difference
  assert config.model.scan_layers == scan

  hf.export_hf(tmp_path / 'run', tmp_path / 'out', fmt=KINDS[kind][3])
  original, exported = _tensors(tmp_path / 'hf'), _tensors(tmp_path / 'out')
  assert sorted(exported) == sorted(original)
  for name, tensor in original.items():
    np.testing.assert_array_equal(exported[name], tensor, err_msg=name)


def test_a_bfloat16_checkpoint_imports_in_bfloat16_and_exports_back_exactly(tmp_path):
  """Released checkpoints are mostly bfloat16: every imported parameter keeps it (the model's
  own layout, so the checkpoint loads), computes transformers' logits from the same bfloat16
  weights, and exports back bit for bit."""
  _hf_model_dir('qwen3', tmp_path / 'hf', torch.bfloat16)
  hf.import_hf(tmp_path / 'hf', tmp_path / 'run', _base_config())
  ours, config, _, params = _our_logits(tmp_path / 'run')
  assert config.model.param_dtype == 'bfloat16'
  assert {leaf.dtype for leaf in jax.tree.leaves(params)} == {jnp.dtype(jnp.bfloat16)}
  # Read back in float32, as ours computes (model.dtype): the same bfloat16 weights.
  torch_model = Qwen3ForCausalLM.from_pretrained(tmp_path / 'hf', dtype=torch.float32).eval()
  difference = np.abs(ours - _torch_logits(torch_model)).max()
  assert difference <= TOLERANCE, difference

  hf.export_hf(tmp_path / 'run', tmp_path / 'out', fmt='qwen3')
  original, exported = (safetensors_torch.load_file(next(directory.glob('*.safetensors')))
                        for directory in (tmp_path / 'hf', tmp_path / 'out'))
  assert sorted(exported) == sorted(original)
  for name, tensor in original.items():
    assert exported[name].dtype == torch.bfloat16 and torch.equal(exported[name], tensor), name


@pytest.mark.parametrize('top_k', [1, 3])
def test_the_load_balance_weight_means_the_same_in_transformers_on_each_layer(top_k):
  """Exported router_aux_loss_coef times transformers' load-balance loss of one layer's router
  logits is our weight times ours (transformers pools several layers before the product; the
  project averages the layers' losses); the import reads the weight back."""
  config = _base_config()
  config.model.moe.update(num_experts=8, top_k=top_k, expert_mlp_dim=16, load_balance_weight=0.02)
  exported = hf.hf_config(config, 'qwen3_moe', 64)
  for layer in range(2):
    logits = np.random.default_rng(layer).normal(size=(2, 16, 8)).astype(np.float32)
    expert, _, probs = route(jnp.asarray(logits), top_k, True)
    ours = float(load_balance_loss(probs, expert))
    theirs = float(load_balancing_loss_func((torch.tensor(logits.reshape(-1, 8)),), 8, top_k))
    np.testing.assert_allclose(exported['router_aux_loss_coef'] * theirs, 0.02 * ours, rtol=1e-5)
  imported, _ = hf.model_config_from_hf(exported, _base_config().model)
  assert imported.moe.load_balance_weight == pytest.approx(0.02)


EXPORTS = {  # name: (gate, model overrides, format auto picks, whether the norms convert)
    'baseline_dense_scanned': ('none', dict(scan_layers=True, tie_embeddings=False), 'qwen3',
                               False),
    'baseline_moe': ('none', dict(moe=dict(num_experts=4, top_k=2, expert_mlp_dim=16,
                                           normalize_top_k=False)), 'qwen3_moe', False),
    'g1_elementwise_w_norms': ('g1_elementwise', dict(rope_fraction=0.5), 'qwen3_next', True),
    'g1_elementwise_moe': ('g1_elementwise', dict(norm_plus_one=True, rope_fraction=0.25, moe=dict(
        num_experts=4, top_k=2, expert_mlp_dim=16, shared_expert_dim=24)), 'qwen3_next', False),
    'g1_headwise': ('g1_headwise', dict(rope_fraction=1.0), 'paper_release', False),
    'baseline_yarn': ('none', dict(rope_fraction=1.0, rope_scaling=dict(
        type='yarn', factor=4.0, original_max_position=8, beta_fast=4.0, mscale=0.8,
        mscale_all_dim=0.5)), 'qwen3', False),
    'g1_headwise_linear': ('g1_headwise', dict(rope_fraction=1.0, rope_scaling=dict(
        type='linear', factor=3.0)), 'paper_release', False),
}


def _workdir(directory, gate: str, overrides: dict):
  """A workdir holding random parameters of a tiny model (a step-0 parameters checkpoint)."""
  config = config_lib.base_config('tiny', gate)
  config.model.update(dict(d_model=32, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=8,
                           mlp_dim=64, vocab_size=300, attention_impl='xla'), **overrides)
  config_lib.validate(config)
  helpers.random_workdir(directory, config, seed=1)


@pytest.mark.parametrize('name', sorted(EXPORTS))
def test_exports_load_in_transformers_compute_ours_and_import_back(name, tmp_path, monkeypatch):
  gate, overrides, fmt, converts_norms = EXPORTS[name]
  if fmt == 'paper_release':
    _paper_release_code(monkeypatch)
  _workdir(tmp_path / 'run', gate, overrides)
  assert hf.export_hf(tmp_path / 'run', tmp_path / 'hf', max_shard_bytes=20_000)['format'] == fmt
  assert (tmp_path / 'hf' / hf.SAFETENSORS_INDEX).exists()  # Several shards, one index.
  # Every file readable as the config is (safetensors alone would write owner-only files).
  modes = {path.stat().st_mode & 0o777 for path in (tmp_path / 'hf').iterdir()}
  assert modes == {(tmp_path / 'hf' / 'config.json').stat().st_mode & 0o777}
  torch_model = AutoModelForCausalLM.from_pretrained(tmp_path / 'hf', dtype=torch.float32)
  assert type(torch_model).__name__ == hf.ARCHITECTURES[fmt]
  ours, _, _, params = _our_logits(tmp_path / 'run')
  difference = np.abs(ours - _torch_logits(torch_model)).max()
  assert difference <= TOLERANCE, difference

  hf.import_hf(tmp_path / 'hf', tmp_path / 'back', _base_config(
      scan_layers=overrides.get('scan_layers', False)))
  _, back = _load(tmp_path / 'back', checkpoint_lib.load_config(tmp_path / 'back'))
  for path, value in jax.tree_util.tree_leaves_with_path(params):
    again = back
    for key in path:
      again = again[key.key]
    if converts_norms and path[-1].key == 'scale':  # Written as (1 + v) norms: v = w - 1.
      np.testing.assert_array_equal(again, np.asarray(value) - np.float32(1), err_msg=str(path))
    else:
      np.testing.assert_array_equal(again, value, err_msg=str(path))


@pytest.mark.parametrize('kind', ['qwen3_next', 'paper_headwise'])
def test_greedy_generation_equals_transformers(kind, tmp_path, monkeypatch):
  if KINDS[kind][3] == 'paper_release':
    _paper_release_code(monkeypatch)
  torch_model = _hf_model_dir(kind, tmp_path / 'hf')
  hf.import_hf(tmp_path / 'hf', tmp_path / 'run', _base_config(attention_impl='chunked'))
  config = checkpoint_lib.load_config(tmp_path / 'run')
  graphdef, params = _load(tmp_path / 'run', config)
  ours = Generator(graphdef, params, config.model, helpers.one_device_mesh()).generate(PROMPTS, 8).tokens
  for prompt, generated in zip(PROMPTS, ours):
    with torch.no_grad():
      theirs = torch_model.generate(torch.tensor([prompt]), max_new_tokens=8, do_sample=False,
                                    pad_token_id=0)
    assert generated == theirs[0, len(prompt):].tolist()


def test_exported_byte_tokenizer_is_the_byte_tokenizer_in_transformers(tmp_path):
  save_byte_tokenizer(tmp_path)
  tokenizer = AutoTokenizer.from_pretrained(tmp_path)
  text = 'def gated(x):\n\treturn σ(x) * x  # €'
  assert tokenizer(text)['input_ids'] == [257, *text.encode()]
  assert (tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id) == (257, 258,
                                                                                     256)
  assert tokenizer.decode(tokenizer(text)['input_ids'], skip_special_tokens=True) == text


QWEN3 = dict(model_type='qwen3', **SHAPES)


@pytest.mark.parametrize('rope, expected', [
    (dict(rope_scaling=dict(type='linear', factor=2.0)), dict(type='linear', factor=2.0)),
    (dict(rope_parameters=dict(rope_type='default', rope_theta=1e4)), dict(type='none')),
    (dict(rope_scaling=None), dict(type='none')),
    # As transformers reads it: the original length defaults to max_position_embeddings.
    (dict(max_position_embeddings=64, rope_parameters=dict(rope_type='yarn', factor=8.0)),
     dict(type='yarn', factor=8.0, original_max_position=64)),
    (dict(max_position_embeddings=64, rope_parameters=dict(
        rope_type='yarn', factor=4.0, original_max_position_embeddings=16, beta_fast=8,
        truncate=False)),
     dict(type='yarn', factor=4.0, original_max_position=16, beta_fast=8.0, truncate=False)),
])
def test_rope_scaling_is_imported_and_exported_back(rope, expected):
  model, fmt = hf.model_config_from_hf(dict(QWEN3, **rope), _base_config().model)
  assert {key: model.rope_scaling[key] for key in expected} == expected
  config = _base_config()
  config.model = model
  back, _ = hf.model_config_from_hf(hf.hf_config(config, fmt, 64), _base_config().model)
  assert back.rope_scaling.to_dict() == model.rope_scaling.to_dict()


def test_yarn_keys_a_checkpoint_leaves_out_take_transformers_defaults_not_the_base_configs():
  base = _base_config().model
  base.rope_scaling.update(mscale=1.0, mscale_all_dim=0.5, attention_factor=1.5, beta_fast=8.0)
  model, _ = hf.model_config_from_hf(dict(QWEN3, max_position_embeddings=64, rope_parameters=dict(
      rope_type='yarn', factor=4.0)), base)
  assert model.rope_scaling.to_dict() == dict(
      config_lib.rope_scaling_config().to_dict(), type='yarn', factor=4.0,
      original_max_position=64)


@pytest.mark.parametrize('config, message', [
    (dict(QWEN3, model_type='llama'), "model_type='llama' is not supported"),
    (dict(QWEN3, model_type='qwen3_next', layer_types=['full_attention', 'linear_attention']),
     "layer_types\\[1\\]='linear_attention'"),
    (dict(QWEN3, attention_bias=True), 'attention_bias=True'),
    (dict(QWEN3, use_sliding_window=True, sliding_window=16), 'use_sliding_window=True'),
    (dict(QWEN3, rope_parameters=dict(rope_type='llama3', factor=4.0, rope_theta=1e4)),
     "rope_parameters.rope_type='llama3' is not supported: the RoPE types implemented are "
     "\\['default', 'linear', 'yarn'\\]"),
    (dict(QWEN3, rope_scaling=dict(type='dynamic', factor=2.0)),
     "rope_scaling.rope_type='dynamic'"),
    # transformers refuses a scaled RoPE without its factor too.
    (dict(QWEN3, rope_parameters=dict(rope_type='yarn', original_max_position_embeddings=16)),
     "rope_parameters.factor=None is not supported: rope_type 'yarn' needs a factor"),
    (dict(QWEN3, rope_scaling=dict(type='linear')), "rope_scaling.factor=None"),
    (dict(QWEN3, partial_rotary_factor=0.5), 'partial_rotary_factor=0.5'),
    (dict(QWEN3, hidden_act='gelu'), "hidden_act='gelu'"),
    (dict(QWEN3, elementwise_attn_output_gate=True, headwise_attn_output_gate=True),
     'headwise_attn_output_gate=True'),
    (dict(QWEN3, model_type='qwen3_moe', mlp_only_layers=[0], **_EXPERTS),
     'mlp_only_layers=\\[0\\]'),
])
def test_unsupported_configs_are_refused_by_key_before_any_weight(config, message, tmp_path):
  """The directory holds config.json alone: reaching the weights would fail differently."""
  (tmp_path / 'config.json').write_text(json.dumps(config))
  with pytest.raises(ConfigError, match=message):
    hf.import_hf(tmp_path, tmp_path / 'run', _base_config())
  assert not (tmp_path / 'run').exists()


def test_an_architecture_key_given_on_the_command_line_is_refused_not_dropped(tmp_path):
  _hf_model_dir('qwen3', tmp_path / 'hf')
  config = _base_config()
  config.model.update(num_layers=7, attention_impl='xla')
  with pytest.raises(ConfigError, match=r"--config.model.num_layers=7: the architecture comes "
                                        r"from .*config.json, which gives 2\."):
    hf.import_hf(tmp_path / 'hf', tmp_path / 'run', config,
                 model_overrides=('attention_impl', 'num_layers'))
  assert not (tmp_path / 'run').exists()
  _hf_model_dir('qwen3_moe', tmp_path / 'moe')
  config = _base_config()
  config.model.moe.capacity_factor = 1.25
  with pytest.raises(ConfigError, match=r"--config.model.moe.capacity_factor=1.25: the "
                                        r"architecture comes from .*config.json, which gives "
                                        r"0.0 \(dropless, as transformers runs it\); train with "
                                        r"another through train.init_from."):
    hf.import_hf(tmp_path / 'moe', tmp_path / 'run', config,
                 model_overrides=('moe.capacity_factor',))


def test_missing_and_misshapen_tensors_are_named(tmp_path):
  _hf_model_dir('qwen3', tmp_path / 'hf')
  tensors = _tensors(tmp_path / 'hf')
  name = 'model.layers.1.self_attn.k_proj.weight'
  save_file({k: v for k, v in tensors.items() if k != name}, tmp_path / 'hf' / 'model.safetensors')
  with pytest.raises(CheckpointError, match=f'tensor {name} is missing'):
    hf.import_hf(tmp_path / 'hf', tmp_path / 'a', _base_config())
  save_file({**tensors, name: tensors[name][:8]}, tmp_path / 'hf' / 'model.safetensors')
  with pytest.raises(CheckpointError, match=f'tensor {name} has shape \\[8, 32\\]; config.json '
                                            'implies \\[16, 32\\]'):
    hf.import_hf(tmp_path / 'hf', tmp_path / 'b', _base_config())
  save_file({**tensors, 'model.layers.0.self_attn.q_proj.bias': tensors[name][:, 0]},
            tmp_path / 'hf' / 'model.safetensors')
  with pytest.raises(CheckpointError, match='q_proj.bias .1 unexpected. has no place'):
    hf.import_hf(tmp_path / 'hf', tmp_path / 'c', _base_config())


def test_malformed_index_and_config_files_are_named(tmp_path):
  _hf_model_dir('qwen3', tmp_path / 'hf')
  (tmp_path / 'hf' / 'model.safetensors').rename(tmp_path / 'hf' / 'weights.safetensors')
  index = tmp_path / 'hf' / hf.SAFETENSORS_INDEX
  for text, message in (('{"weight_map": ', 'is not valid JSON'),
                        ('{"metadata": {}}', 'has no weight_map of tensor names to files'),
                        ('[1, 2]', 'holds a JSON list, not an object of keys')):
    index.write_text(text)
    with pytest.raises(CheckpointError, match=f'{index}.* {message}'):
      hf.import_hf(tmp_path / 'hf', tmp_path / 'run', _base_config())
  (tmp_path / 'hf' / 'config.json').write_text('[1, 2]')
  with pytest.raises(CheckpointError, match='config.json holds a JSON list'):
    hf.import_hf(tmp_path / 'hf', tmp_path / 'run', _base_config())


def test_an_export_replaces_every_weight_file_of_an_earlier_one(tmp_path):
  """Shards, then one file, then shards again into one --out: what is left is the last export
  alone (transformers and import would otherwise read different models). A YaRN model's
  max_position_embeddings is original_max_position x factor, as transformers expects."""
  _workdir(tmp_path / 'run', 'none', dict(rope_fraction=1.0, rope_scaling=dict(
      type='yarn', factor=4.0, original_max_position=8)))
  out = tmp_path / 'hf'
  weights = lambda: sorted(p.name for p in out.iterdir() if p.name.startswith('model'))
  hf.export_hf(tmp_path / 'run', out, max_shard_bytes=20_000)
  shards = weights()
  assert hf.SAFETENSORS_INDEX in shards and 'model.safetensors' not in shards
  hf.export_hf(tmp_path / 'run', out)
  assert weights() == ['model.safetensors']
  hf.export_hf(tmp_path / 'run', out, max_shard_bytes=20_000)
  assert weights() == shards
  assert hf.read_hf_config(out)['max_position_embeddings'] == 32


@pytest.mark.parametrize('gate, overrides, fmt, message', [
    ('g5', {}, 'auto', "model.gate.position='dense'"),
    ('g2_elementwise', {}, 'auto', "model.gate.position='value'"),
    ('g1_silu', {}, 'auto', "model.gate.activation='silu'"),
    ('g1_head_shared', {}, 'auto', 'model.gate.head_shared=True'),
    ('g1_additive_silu', dict(), 'qwen3_next', "model.gate.activation='silu'"),
    ('sdpa_rms_norm', {}, 'auto', "model.gate.sdpa_nonlinearity='rms_norm'"),
    ('none', dict(sandwich_norm=True), 'auto', 'model.sandwich_norm=True'),
    ('g1_headwise', {}, 'qwen3_next', "model.gate.granularity='headwise'"),
    ('g1_elementwise', {}, 'qwen3', "model.gate.position='sdpa'"),
    ('g1_elementwise', dict(rope_fraction=0.5), 'paper_release', 'model.rope_fraction=0.5'),
    ('none', dict(rope_fraction=0.5), 'auto', 'model.rope_fraction=0.5'),
    ('none', dict(rope_fraction=1.0), 'qwen3_moe', 'model.moe.num_experts=0'),
    ('g1_elementwise', dict(moe=dict(num_experts=4)), 'auto', 'model.moe.shared_expert_dim=0'),
    ('g1_elementwise', dict(rope_fraction=1.0, moe=dict(num_experts=4)), 'paper_release',
     'model.moe.num_experts=4'),
    ('none', dict(rope_fraction=1.0, qk_norm=False), 'auto', 'model.qk_norm=False'),
    ('none', {}, 'gguf', "--format='gguf'"),
])
def test_export_refuses_what_its_format_cannot_hold(gate, overrides, fmt, message):
  model = helpers.model_config(gate, **overrides)
  with pytest.raises(ConfigError, match=message):
    hf.export_format(model, fmt)


def _run(module, *args, devices=1):
  return subprocess.run([sys.executable, '-m', module, *args], cwd=REPO, env=helpers.env(devices),
                        capture_output=True, text=True, timeout=300)


def test_commands_import_and_generate_on_a_mesh_and_bad_input_is_one_line(tmp_path):
  """import_hf on an fsdp x tensor mesh, generate on a data x tensor mesh, against transformers'
  greedy continuation; errors are one line."""
  torch_model = _hf_model_dir('qwen3_next', tmp_path / 'hf')
  (tmp_path / 'hf' / 'tokenizer.json').unlink()  # A model without a tokenizer: ids only.
  imported = _run('experiments.import_hf', f'--hf_dir={tmp_path / "hf"}',
                  f'--workdir={tmp_path / "run"}', '--mesh=data=1,fsdp=2,tensor=2,expert=1',
                  devices=4)
  assert imported.returncode == 0, imported.stderr
  assert 'imported qwen3_next' in imported.stdout and 'MB/s' in imported.stdout
  ids = ','.join(map(str, PROMPTS[0]))
  generated = _run('experiments.generate', f'--workdir={tmp_path / "run"}', f'--prompt_ids={ids}',
                   '--max_new_tokens=6', '--mesh=data=2,fsdp=1,tensor=2,expert=1', '--json',
                   devices=4)
  assert generated.returncode == 0, generated.stderr
  result = json.loads(generated.stdout)  # The JSON alone: progress goes to standard error.
  with torch.no_grad():
    theirs = torch_model.generate(torch.tensor([PROMPTS[0]]), max_new_tokens=6, do_sample=False,
                                  pad_token_id=0)
  assert result['completions'][0]['token_ids'] == theirs[0, len(PROMPTS[0]):].tolist()
  assert result['decode_tokens_per_sec'] > 0 and result['prefill_tokens_per_sec'] > 0

  refused = _run('experiments.generate', f'--workdir={tmp_path / "run"}', '--prompt=hello')
  assert refused.returncode == 1
  assert refused.stderr.strip().splitlines() == [
      "error: this model has no tokenizer (data.tokenizer='none'): give prompts as "
      '--prompt_ids=ID,ID,...']


def test_export_refuses_to_write_into_a_training_run(tmp_path):
  helpers.random_workdir(tmp_path, helpers.run_config(steps=2))
  with pytest.raises(ConfigError, match=r'--out=.* holds a training run \(checkpoints/\)'):
    hf.export_hf(tmp_path, tmp_path)
  assert checkpoint_lib.load_config(tmp_path).model.d_model == helpers.run_config().model.d_model
