"""Config validation: one clear error naming the key and what is accepted."""

import re

import ml_collections
import pytest

from configs import lm
from gated_attention import config as config_lib


def _config(**model):
  config = config_lib.base_config('tiny', 'g1_elementwise')
  config.model.update(model)
  return config


@pytest.mark.parametrize('name', sorted(config_lib.GATE_PRESETS))
def test_every_gate_preset_validates(name):
  config_lib.validate(config_lib.base_config('tiny', name))


@pytest.mark.parametrize('alias, position', sorted(config_lib.GATE_POSITION_ALIASES.items()))
def test_position_aliases(alias, position):
  config = _config()
  config.model.gate.position = alias
  config_lib.validate(config)
  assert config_lib.canonical_gate_position(alias) == position


@pytest.mark.parametrize('change, message', [
    (lambda c: c.model.update(num_heads=6, num_kv_heads=4), 'model.num_heads=6 must be a multiple'),
    (lambda c: c.model.gate.update(position='g7'), "model.gate.position='g7'"),
    (lambda c: c.model.gate.update(activation='tanh'), "model.gate.activation='tanh'"),
    (lambda c: c.model.gate.update(granularity='blockwise'), 'model.gate.granularity'),
    (lambda c: c.model.gate.update(mode='concat'), "model.gate.mode='concat'"),
    (lambda c: c.model.gate.update(position='g5', granularity='headwise'), 'has no heads'),
    (lambda c: c.model.gate.update(position='dense', head_shared=True), 'has no heads'),
    (lambda c: c.model.update(rope_fraction=0.1), 'model.rope_fraction=0.1'),
    (lambda c: c.model.update(attention_impl='flash'), "model.attention_impl='flash'"),
    (lambda c: c.model.update(attention_impl='cudnn'),
     'model.attention_impl=cudnn takes model.dtype bfloat16 or float16'),
    (lambda c: c.model.update(dtype='float8'), "model.dtype='float8'"),
    (lambda c: c.model.update(vocab_size=200), 'model.vocab_size=200'),
    (lambda c: c.data.update(source='web'), "data.source='web'"),
    (lambda c: c.data.update(source='text_files'), 'data.path is empty'),
    (lambda c: c.train.update(warmup_steps=10_000), 'train.warmup_steps=10000'),
    (lambda c: c.train.update(steps=10, warmup_steps=10),
     'train.warmup_steps=10 must be in [0, train.steps=10): the cosine decay'),
    (lambda c: c.train.update(on_nonfinite='ignore'), "train.on_nonfinite='ignore'"),
    (lambda c: c.train.update(grad_clip=0.0), 'train.grad_clip=0.0 must be positive'),
    (lambda c: c.train.update(b2=1.0), 'train.b2=1.0 must be in'),
    (lambda c: c.train.update(weight_decay=-0.1), 'train.weight_decay=-0.1 must be 0 or'),
    (lambda c: c.model.moe.update(num_experts=4, impl='ragged', capacity_factor=1.25),
     'model.moe.impl=ragged never drops a token'),
    (lambda c: c.eval.update(analysis_batches=100), 'eval.analysis_batches=100'),
    (lambda c: c.model.update(init_std=0.0), 'model.init_std=0.0 must be positive'),
    (lambda c: c.model.update(norm_eps=float('nan')), 'model.norm_eps=nan must be positive'),
    (lambda c: c.train.update(learning_rate=float('inf')), 'train.learning_rate=inf must be'),
    (lambda c: c.train.update(weight_decay=float('nan')), 'train.weight_decay=nan must be 0'),
    (lambda c: c.model.moe.update(num_experts=4, capacity_factor=float('nan')),
     'model.moe.capacity_factor=nan must be 0 (dropless)'),
    (lambda c: c.model.moe.update(num_experts=4, load_balance_weight=-1.0),
     'model.moe.load_balance_weight=-1.0 must be 0 (off) or positive and finite'),
    (lambda c: c.model.moe.update(num_experts=4, router_z_weight=float('nan')),
     'model.moe.router_z_weight=nan must be 0 (off)'),
    (lambda c: c.model.update(rope_theta=1.0), 'model.rope_theta=1.0 must be finite and above 1'),
    (lambda c: c.train.update(peak_flops_per_device=-5.0),
     'train.peak_flops_per_device=-5.0 must be 0 (look the device up)'),
    (lambda c: c.train.update(seed=-1), 'train.seed=-1 must be 0 or positive'),
    (lambda c: c.data.bigram_backcopy.update(seed=-2), 'data.bigram_backcopy.seed=-2 must be'),
    (lambda c: c.data.update(path='/data/*.txt'),
     "data.path='/data/*.txt' is read by data.source text_files or array_record, not 'embedded'"),
    (lambda c: c.data.update(source='text_files', path='x', eval_path='y'),
     "data.eval_path='y' is read by data.source=array_record only"),
    (lambda c: c.model.update(match_baseline_params=True, mlp_dim=8),
     'model.match_baseline_params narrows model.mlp_dim=8 to -32'),
    (lambda c: c.model.rope_scaling.update(factor=4.0),
     "model.rope_scaling.factor=4.0 is not read by model.rope_scaling.type='none'"),
    (lambda c: c.model.rope_scaling.update(type='linear', factor=2.0, beta_fast=8.0),
     "model.rope_scaling.beta_fast=8.0 is not read by model.rope_scaling.type='linear': set the "
     'type that reads it (yarn)'),
    (lambda c: c.model.rope_scaling.update(type='yarn', factor=4.0, original_max_position=64,
                                           attention_factor=-1.0),
     'model.rope_scaling.attention_factor=-1.0 must be 0 (derived from the factor)'),
    (lambda c: c.data.update(source='bigram_backcopy', tokenizer='none'),
     "data.tokenizer='none': data.source=bigram_backcopy generates byte sequences"),
    (lambda c: setattr(c.model, 'gate', {'position': 'value'}),
     "the config has no key 'granularity' where one is read"),
])
def test_bad_values_name_the_key(change, message):
  config = _config()
  change(config)
  with pytest.raises(config_lib.ConfigError, match=re.escape(message)):
    config_lib.validate(config)


@pytest.mark.parametrize('position', ['g3', 'g4'])
def test_a_headwise_key_or_query_gate_is_refused_where_the_qk_norm_divides_it_out(position):
  """RMSNorm(c x) = RMSNorm(x) for one number c > 0 per head and token: a headwise
  multiplicative gate before the QK-norm would do nothing."""
  config = _config()
  config.model.gate.update(position=position, granularity='headwise')
  with pytest.raises(config_lib.ConfigError, match='the gate would do nothing'):
    config_lib.validate(config)
  for change in (dict(granularity='elementwise'), dict(mode='additive', activation='silu')):
    accepted = _config()
    accepted.model.gate.update({'position': position, 'granularity': 'headwise', **change})
    config_lib.validate(accepted)
  config.model.qk_norm = False
  config_lib.validate(config)


def test_unknown_gate_and_size_names_list_the_choices():
  with pytest.raises(config_lib.ConfigError, match='g1_elementwise'):
    config_lib.base_config('tiny', 'g9')
  with pytest.raises(config_lib.ConfigError, match="size='huge'.*tiny"):
    config_lib.base_config('huge')


def test_parse_arg():
  parsed = config_lib.parse_arg('size=small,gate=g5', size='tiny', gate='none')
  assert (parsed.size, parsed.gate) == ('small', 'g5')
  with pytest.raises(config_lib.ConfigError, match="'colour=red'"):
    config_lib.parse_arg('colour=red', size='tiny')
  with pytest.raises(config_lib.ConfigError, match="'size=tiny,size=small' gives size twice"):
    config_lib.parse_arg('size=tiny,size=small', size='tiny')


def test_lm_config_file_takes_size_and_gate():
  config = lm.get_config('size=small,gate=g2_headwise')
  assert config.model.d_model == config_lib.SIZES['small']['d_model']
  assert (config.model.gate.position, config.model.gate.granularity) == ('value', 'headwise')


def test_a_config_saved_by_earlier_code_is_upgraded_to_todays_keys():
  saved = config_lib.base_config('tiny').to_dict()
  del saved['model']['rope_scaling'], saved['model']['scan_layers']
  saved['model']['remat'] = True
  upgraded = config_lib.upgrade(saved)
  assert upgraded['model']['remat'] == 'full'
  assert upgraded['model']['scan_layers'] is False
  assert upgraded['model']['rope_scaling']['type'] == 'none'
  config_lib.validate(ml_collections.ConfigDict(upgraded))
  assert saved['model']['remat'] is True  # The saved dict itself is left as it was.


def test_keys_set_where_nothing_reads_them_are_named():
  config = config_lib.base_config(gate='none')
  assert config_lib.unread_keys(config) == []
  config.model.gate.update(activation='silu', sdpa_nonlinearity='rms_norm')
  config.model.moe.top_k = 4
  config.data.bigram_backcopy.num_triggers = 5
  assert config_lib.unread_keys(config) == [
      "model.gate.activation='silu'", 'model.moe.top_k=4', 'data.bigram_backcopy.num_triggers=5']
  config.model.gate.position = 'g1'
  config.model.moe.num_experts = 8
  config.data.source = 'bigram_backcopy'
  assert config_lib.unread_keys(config) == []
