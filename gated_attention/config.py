"""The experiment configuration: defaults, size and gate presets, and start-up validation.

Config files in `configs/` build on `base_config()`; `validate(config)` runs once at start-up
and raises `ConfigError` naming the key, the value and what would be accepted.
"""

import copy
import math

import ml_collections

GATE_POSITIONS = ('none', 'sdpa', 'value', 'key', 'query', 'dense')
GATE_POSITION_ALIASES = {'g1': 'sdpa', 'g2': 'value', 'g3': 'key', 'g4': 'query', 'g5': 'dense'}
GATE_GRANULARITIES = ('elementwise', 'headwise')
GATE_MODES = ('multiplicative', 'additive')
GATE_ACTIVATIONS = ('sigmoid', 'silu', 'identity', 'ns_sigmoid')
SDPA_NONLINEARITIES = ('none', 'rms_norm', 'silu')
# Each model.rope_scaling.type and the keys of model.rope_scaling it reads.
ROPE_SCALING_KEYS = {
    'none': (),
    'linear': ('factor',),
    'yarn': ('factor', 'original_max_position', 'beta_fast', 'beta_slow', 'attention_factor',
             'mscale', 'mscale_all_dim', 'truncate'),
}
ATTENTION_IMPLS = ('auto', 'xla', 'dot_product', 'cudnn', 'chunked', 'splash', 'cpu_flash')
SPLASH_BLOCK = 128  # The splash kernel's smallest block along the sequence.
REMAT_POLICIES = ('none', 'full', 'save_dots')
MOE_IMPLS = ('capacity', 'ragged')
DTYPES = ('float32', 'bfloat16', 'float16')
CUDNN_DTYPES = ('bfloat16', 'float16')  # What cuDNN's fused attention computes in.
DATA_SOURCES = ('embedded', 'text_files', 'array_record', 'bigram_backcopy')
ON_NONFINITE = ('stop', 'skip')

# Named gate variants: the paper's rows (Tables 1 and 4), reachable as `gate=NAME` in configs.
_G1 = dict(position='sdpa')
GATE_PRESETS: dict[str, dict] = {
    'none': dict(position='none'),
    'g1_elementwise': _G1,
    'g1_headwise': dict(_G1, granularity='headwise'),
    'g1_head_shared': dict(_G1, head_shared=True),
    'g1_headwise_head_shared': dict(_G1, granularity='headwise', head_shared=True),
    'g1_additive_silu': dict(_G1, mode='additive', activation='silu'),
    'g1_silu': dict(_G1, activation='silu'),
    'g1_ns_sigmoid': dict(_G1, activation='ns_sigmoid'),
    'g1_input_independent': dict(_G1, input_dependent=False),
    'g2_elementwise': dict(position='value'),
    'g2_headwise': dict(position='value', granularity='headwise'),
    'g2_head_shared': dict(position='value', head_shared=True),
    'g3_elementwise': dict(position='key'),
    'g4_elementwise': dict(position='query'),
    'g5': dict(position='dense'),
    'sdpa_rms_norm': dict(position='none', sdpa_nonlinearity='rms_norm'),
    'sdpa_silu': dict(position='none', sdpa_nonlinearity='silu'),
}

# Model sizes that train on a CPU. The paper's shapes live in their own preset file.
SIZES: dict[str, dict] = {
    'tiny': dict(d_model=128, num_layers=4, num_heads=4, num_kv_heads=2, head_dim=32,
                 mlp_dim=384),
    'small': dict(d_model=256, num_layers=4, num_heads=8, num_kv_heads=8, head_dim=32,
                  mlp_dim=768),
}
SIZE_DATA = {'tiny': dict(seq_len=128, batch_size=16), 'small': dict(seq_len=256, batch_size=16)}


class ConfigError(ValueError):
  """A config value that cannot be used; the message names the key and the accepted values."""


def gate_config(name: str = 'none') -> ml_collections.ConfigDict:
  """The `config.model.gate` block for a named variant (see `GATE_PRESETS`)."""
  if name not in GATE_PRESETS:
    raise ConfigError(f'gate={name!r} is not a known variant; choose one of '
                      f'{sorted(GATE_PRESETS)} or set config.model.gate.* directly.')
  gate = ml_collections.ConfigDict(dict(
      position='none', granularity='elementwise', head_shared=False, mode='multiplicative',
      activation='sigmoid', input_dependent=True, sdpa_nonlinearity='none'))
  gate.update(GATE_PRESETS[name])
  return gate


def set_variant(model: ml_collections.ConfigDict, spec: str, flag: str) -> None:
  """Makes `model` (a config.model block) the variant `spec`: a gate preset (GATE_PRESETS),
  optionally followed by model keys for this variant alone, 'PRESET+KEY=VALUE+...' with KEY a
  path under config.model (g1_elementwise+gate.activation=ns_sigmoid, none+num_kv_heads=4).
  Errors name `flag`, the list the spec came from."""
  preset, *assignments = spec.split('+')
  if preset not in GATE_PRESETS:
    raise ConfigError(
        f'{flag}: {spec!r} does not start with a known gate variant; choose one of '
        f'{sorted(GATE_PRESETS)}, optionally followed by model keys for that variant alone: '
        'g1_elementwise+gate.activation=ns_sigmoid, none+num_kv_heads=4.')
  model.gate = gate_config(preset)
  for assignment in assignments:
    key, sep, text = assignment.partition('=')
    *blocks, leaf = key.split('.')
    node = model
    for block in blocks:
      node = node.get(block) if isinstance(node, ml_collections.ConfigDict) else None
    if not (sep and text):
      raise ConfigError(f'{flag}: {spec!r}: {assignment!r} is not KEY=VALUE.')
    if (not isinstance(node, ml_collections.ConfigDict) or leaf not in node
        or isinstance(node[leaf], ml_collections.ConfigDict)):
      raise ConfigError(f'{flag}: {spec!r}: model.{key} is not a model key with a value (the '
                        'keys are those of config.model, as --config.model.KEY sets them).')
    node[leaf] = parse_value(text, node[leaf], f'{flag}: {spec!r}: model.{key}')


def rope_scaling_config() -> ml_collections.ConfigDict:
  """model.rope_scaling's defaults (those of Hugging Face's RoPE types too), for longer contexts
  (gated_attention.layers.ROPE_SCALINGS): 'linear' divides every frequency by factor; 'yarn' as
  the YaRN paper and rope_type 'yarn' (attention_factor 0: derived from factor, or from mscale /
  mscale_all_dim when both are set)."""
  return ml_collections.ConfigDict(dict(
      type='none', factor=1.0, original_max_position=0, beta_fast=32.0, beta_slow=1.0,
      attention_factor=0.0, mscale=0.0, mscale_all_dim=0.0, truncate=True))


def base_config(size: str = 'tiny', gate: str = 'g1_elementwise') -> ml_collections.ConfigDict:
  """Every key the library reads, with defaults for a `size` model and a `gate` variant."""
  if size not in SIZES:
    raise ConfigError(f'size={size!r} is not a known size; choose one of {sorted(SIZES)}.')
  config = ml_collections.ConfigDict()
  config.model = ml_collections.ConfigDict(dict(
      vocab_size=384,  # 259 byte-level ids, padded to a multiple of 128 for the MXU/tensor cores.
      tie_embeddings=True,
      qk_norm=True,
      norm_plus_one=False,  # RMSNorm scale (1 + w) with w zero-initialised, as Qwen3-Next.
      norm_eps=1e-6,
      sandwich_norm=False,  # Extra RMSNorm on the attention output before the residual add.
      rope_theta=10_000.0,
      rope_fraction=1.0,
      attention_impl='auto',
      dtype='float32',
      param_dtype='float32',
      init_std=0.02,
      # What a block keeps for the backward pass: everything ('none'), only its input
      # ('full'), or its weight matmuls' and fused attention kernel's outputs ('save_dots'); see
      # gated_attention.model.
      remat='none',
      scan_layers=False,  # Stack the layers' parameters and run one block under lax.scan.
      # The query, key and value projections (and a gate's W_theta they carry) as one matrix
      # product, and the SwiGLU's two as one; the same function either way (see the README).
      fused_projections=False,
      # Positions whose logits the loss takes at a time (0: all); it must divide data.seq_len.
      # Float32 logits of batch x loss_chunk x vocab are alive at once (gated_attention/loss.py).
      loss_chunk=0,
      **SIZES[size]))
  config.model.gate = gate_config(gate)
  config.model.rope_scaling = rope_scaling_config()
  # Mixture of experts in place of the dense MLP when num_experts > 0 (gated_attention/moe.py).
  config.model.moe = ml_collections.ConfigDict(dict(
      num_experts=0, top_k=2, expert_mlp_dim=64, capacity_factor=0.0, normalize_top_k=True,
      load_balance_weight=0.01, router_z_weight=0.001, impl='capacity',
      shared_expert_dim=0))  # > 0: a shared expert of this width with a sigmoid gate.
  # Narrow a gated model's dense MLP so its parameters equal the ungated model's (the paper's
  # dense comparisons); see gated_attention.model.mlp_width.
  config.model.match_baseline_params = False
  config.data = ml_collections.ConfigDict(dict(
      source='embedded', path='', eval_path='', heldout_fraction=0.05,
      tokenizer='byte',  # 'byte', 'none', or a tokenizer.json (gated_attention/tokenizer.py).
      **SIZE_DATA[size]))
  # data.source=bigram_backcopy: the synthetic task of gated_attention/bigram_backcopy.py.
  config.data.bigram_backcopy = ml_collections.ConfigDict(dict(
      num_triggers=3,  # The most frequent bytes; the token after one copies the token before it.
      bigram_path='',  # Glob of text files whose byte bigrams drive the chain; '': embedded corpus.
      seed=0))  # Seeds the sequences themselves; train.seed only orders them.
  config.train = ml_collections.ConfigDict(dict(
      steps=300, learning_rate=2e-3, warmup_steps=30, min_learning_rate=2e-4,
      weight_decay=0.1, b1=0.9, b2=0.95, grad_clip=1.0, seed=0, log_every=10,
      checkpoint_every=100, keep_checkpoints=2, on_nonfinite='stop',
      # A loss spike: a loss above the median of the previous loss_spike_window losses by
      # more than loss_spike_margin (relative).
      loss_spike_window=50, loss_spike_margin=0.25,
      microbatches=1,  # Gradient accumulation: the batch is processed in this many parts.
      peak_flops_per_device=0.0,  # 0: look the device up in the table (mfu is null if unknown).
      # A new run starts from the parameters of another run's (or an imported model's)
      # checkpoint, 'DIR' (its latest) or 'DIR:STEP', with this config (gated_attention.init_from);
      # init_from_optimizer: its optimizer moments too. '' initialises.
      init_from='', init_from_optimizer=False,
      # profile_steps > 0: jax.profiler traces that many steps, after this process's first
      # profile_after steps (the first runs a fresh program), into WORKDIR/profile/process_N.
      profile_steps=0, profile_after=1))
  config.eval = ml_collections.ConfigDict(dict(batches=8, batch_size=16, analysis_batches=2))
  config.mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=1, tensor=1, expert=1))
  return config


def parse_arg(arg: str, **defaults) -> ml_collections.ConfigDict:
  """Parses 'key=value,key=value' (the part after ':' in --config=file.py:ARG) over `defaults`."""
  parsed, given = ml_collections.ConfigDict(defaults), set()
  for item in filter(None, (arg or '').split(',')):
    key, sep, value = item.partition('=')
    if not sep or key not in defaults:
      raise ConfigError(f'Config argument {item!r}: expected key=value with key one of '
                        f'{sorted(defaults)}.')
    if key in given:
      raise ConfigError(f'Config argument {arg!r} gives {key} twice.')
    given.add(key)
    parsed[key] = parse_value(value, defaults[key], key)
  return parsed


def parse_value(text: str, like, key: str):
  """`text` as a value of `like`'s type (bool from true/false, int, float or str), as a
  command line gives it for `key`; ConfigError naming the key otherwise."""
  try:
    if isinstance(like, bool):
      return {'true': True, 'false': False}[text.strip().lower()]
    return type(like)(text)
  except (KeyError, ValueError):
    kind = ('true or false' if isinstance(like, bool) else
            {int: 'an integer', float: 'a number'}.get(type(like), type(like).__name__))
    raise ConfigError(f'{key}={text!r}: expected {kind}.') from None


def parse_list(text: str, key: str, kind=str, empty_ok: bool = False) -> list:
  """'a,b,c' -> [a, b, c] (converted with kind); a bad item, or no item unless empty_ok, is a
  ConfigError naming `key`."""
  items = [item.strip() for item in text.split(',') if item.strip()]
  if not items and not empty_ok:
    raise ConfigError(f'{key}={text!r} names nothing: give a comma-separated list.')
  try:
    return [kind(item) for item in items]
  except ValueError:
    raise ConfigError(f'{key}={text!r}: expected comma-separated {kind.__name__}s.') from None


def canonical_gate_position(position: str) -> str:
  return GATE_POSITION_ALIASES.get(position, position)


def _check_choice(key: str, value, choices) -> None:
  if value not in choices:
    raise ConfigError(f'{key}={value!r} is not accepted; choose one of {list(choices)}.')


def _check_positive(key: str, value) -> None:
  if not (value > 0 and math.isfinite(value)):
    raise ConfigError(f'{key}={value!r} must be positive{_finite(value)}.')


def _check_non_negative(key: str, value, zero_means: str = '') -> None:
  if not (value >= 0 and math.isfinite(value)):
    raise ConfigError(f'{key}={value!r} must be 0{f" ({zero_means})" if zero_means else ""} or '
                      f'positive{_finite(value)}.')


def _finite(value) -> str:
  return ' and finite' if isinstance(value, float) else ''


def upgrade(saved: dict) -> dict:
  """A config saved by an earlier version of this code, in today's keys: a key added since takes
  its `base_config()` default (a new key's default is always the behaviour before it existed),
  and a boolean model.remat becomes the policy it meant."""
  def fill(node: dict, defaults: dict) -> dict:
    for key, default in defaults.items():
      if key not in node:
        node[key] = copy.deepcopy(default)
      elif isinstance(default, dict) and isinstance(node[key], dict):
        fill(node[key], default)
    return node

  upgraded = fill(copy.deepcopy(saved), base_config().to_dict())
  if isinstance(upgraded['model']['remat'], bool):
    upgraded['model']['remat'] = 'full' if upgraded['model']['remat'] else 'none'
  return upgraded


def _check_tokenizer(config) -> None:
  """data.tokenizer must be readable and its ids must fit the model."""
  from gated_attention.tokenizer import load_tokenizer  # It raises ConfigError itself.
  tokenizer = load_tokenizer(config.data.tokenizer)
  if tokenizer is not None and config.model.vocab_size < tokenizer.vocab_size:
    raise ConfigError(f'model.vocab_size={config.model.vocab_size} is smaller than the '
                      f'{tokenizer.vocab_size} ids of data.tokenizer={config.data.tokenizer!r}.')


def trained_context(config: ml_collections.ConfigDict) -> int:
  """The longest sequence the model was trained for: data.seq_len, or YaRN's factor times its
  original length."""
  scaling = config.model.rope_scaling
  return (round(scaling.original_max_position * scaling.factor) if scaling.type == 'yarn'
          else config.data.seq_len)


def unread_keys(config: ml_collections.ConfigDict) -> list[str]:
  """'key=value' of each key set away from its default that this config never reads: gate keys
  without a gate, MoE keys without experts, Bigram-Backcopy keys for another data source."""
  defaults = base_config()
  blocks = []
  if canonical_gate_position(config.model.gate.position) == 'none':
    blocks.append(('model.gate', config.model.gate, gate_config('none'),
                   ('position', 'sdpa_nonlinearity')))  # The latter applies without a gate.
  if not config.model.moe.num_experts:
    blocks.append(('model.moe', config.model.moe, defaults.model.moe, ('num_experts',)))
  if config.data.source != 'bigram_backcopy':
    blocks.append(('data.bigram_backcopy', config.data.bigram_backcopy,
                   defaults.data.bigram_backcopy, ()))
  return [f'{name}.{key}={value!r}' for name, block, default, read in blocks
          for key, value in block.items() if key not in read and value != default[key]]


def validate(config: ml_collections.ConfigDict) -> None:
  """Checks every key the library reads; raises one ConfigError naming the first bad key."""
  try:
    _validate(config)
  except (AttributeError, KeyError) as error:  # A block replaced by a dict that lacks keys.
    missing = str(error).strip('"\'')
    raise ConfigError(f'the config has no key {missing!r} where one is read: override single '
                      'keys (--config.model.gate.position=value), not a whole block.') from None


def _validate(config: ml_collections.ConfigDict) -> None:
  model, gate = config.model, config.model.gate
  for key in ('vocab_size', 'd_model', 'num_layers', 'num_heads', 'num_kv_heads', 'head_dim',
              'mlp_dim'):
    _check_positive(f'model.{key}', model[key])
  if model.num_heads % model.num_kv_heads:
    raise ConfigError(f'model.num_heads={model.num_heads} must be a multiple of '
                      f'model.num_kv_heads={model.num_kv_heads} (grouped-query attention).')
  if not 0 < model.rope_fraction <= 1:
    raise ConfigError(f'model.rope_fraction={model.rope_fraction} must be in (0, 1].')
  rotary = int(model.head_dim * model.rope_fraction)
  if rotary % 2 or rotary == 0:
    raise ConfigError(f'model.rope_fraction={model.rope_fraction} gives {rotary} rotary dims of '
                      f'head_dim={model.head_dim}; it must be a positive even number.')
  if not (model.rope_theta > 1 and math.isfinite(model.rope_theta)):  # NaN fails too.
    raise ConfigError(f'model.rope_theta={model.rope_theta!r} must be finite and above 1 (the '
                      'base whose powers set the rotary wavelengths; 10000 in the paper).')
  _check_positive('model.init_std', model.init_std)
  _check_positive('model.norm_eps', model.norm_eps)
  scaling = model.rope_scaling
  _check_choice('model.rope_scaling.type', scaling.type, ROPE_SCALING_KEYS)
  defaults = rope_scaling_config()
  for key, default in defaults.items():
    if key != 'type' and key not in ROPE_SCALING_KEYS[scaling.type] and scaling[key] != default:
      raise ConfigError(
          f'model.rope_scaling.{key}={scaling[key]!r} is not read by model.rope_scaling.type='
          f'{scaling.type!r}: set the type that reads it ('
          + ', '.join(t for t, keys in ROPE_SCALING_KEYS.items() if key in keys)
          + f') or leave it at {default!r}.')
  if scaling.type != 'none' and not scaling.factor >= 1:
    raise ConfigError(f'model.rope_scaling.factor={scaling.factor} must be >= 1 for '
                      f'model.rope_scaling.type={scaling.type!r}.')
  if scaling.type == 'yarn':
    _check_positive('model.rope_scaling.original_max_position', scaling.original_max_position)
    if not scaling.beta_fast > scaling.beta_slow > 0:
      raise ConfigError(f'model.rope_scaling.beta_fast={scaling.beta_fast} must exceed '
                        f'model.rope_scaling.beta_slow={scaling.beta_slow} > 0.')
    for key in ('attention_factor', 'mscale', 'mscale_all_dim'):
      _check_non_negative(f'model.rope_scaling.{key}', scaling[key], 'derived from the factor')
  _check_choice('model.attention_impl', model.attention_impl, ATTENTION_IMPLS)
  if isinstance(model.remat, bool):
    raise ConfigError(f'model.remat={model.remat!r}: model.remat now names a policy, one of '
                      f'{list(REMAT_POLICIES)} (True was \'full\', False \'none\').')
  _check_choice('model.remat', model.remat, REMAT_POLICIES)
  _check_choice('model.dtype', model.dtype, DTYPES)
  _check_choice('model.param_dtype', model.param_dtype, DTYPES)
  if model.attention_impl == 'cpu_flash' and model.dtype != 'float32':
    raise ConfigError(f'model.attention_impl=cpu_flash computes in float32, not '
                      f'model.dtype={model.dtype!r}: choose float32, or auto (chunked in other '
                      'dtypes on CPUs), chunked or xla.')
  if model.attention_impl == 'cudnn' and model.dtype not in CUDNN_DTYPES:
    raise ConfigError(f'model.attention_impl=cudnn takes model.dtype bfloat16 or float16 (what '
                      f'cuDNN\'s fused attention computes in), not {model.dtype!r}: choose a '
                      '16-bit model.dtype, or auto (chunked in float32 on GPUs), chunked, xla or '
                      'dot_product.')

  position = canonical_gate_position(gate.position)
  _check_choice('model.gate.position', gate.position, GATE_POSITIONS + tuple(GATE_POSITION_ALIASES))
  _check_choice('model.gate.granularity', gate.granularity, GATE_GRANULARITIES)
  _check_choice('model.gate.mode', gate.mode, GATE_MODES)
  _check_choice('model.gate.activation', gate.activation, GATE_ACTIVATIONS)
  _check_choice('model.gate.sdpa_nonlinearity', gate.sdpa_nonlinearity, SDPA_NONLINEARITIES)
  if (position in ('key', 'query') and gate.granularity == 'headwise'
      and gate.mode == 'multiplicative' and model.qk_norm):
    raise ConfigError(f'model.gate.position={gate.position} with granularity=headwise and '
                      f'mode=multiplicative scales each head\'s {position} vector by one number, '
                      f'which model.qk_norm=True (the RMSNorm right after) divides out again: '
                      'the gate would do nothing. Use granularity=elementwise, mode=additive, '
                      'or model.qk_norm=False.')
  if position == 'dense' and (gate.granularity == 'headwise' or gate.head_shared):
    raise ConfigError('model.gate.position=dense (G5) gates the d_model-wide output of W_o, which '
                      'has no heads: use granularity=elementwise and head_shared=False.')

  moe = model.moe
  if moe.num_experts < 0:
    raise ConfigError(f'model.moe.num_experts={moe.num_experts} must be 0 (dense) or positive.')
  if moe.num_experts:
    if not 1 <= moe.top_k <= moe.num_experts:
      raise ConfigError(f'model.moe.top_k={moe.top_k} must be in [1, model.moe.num_experts='
                        f'{moe.num_experts}].')
    _check_positive('model.moe.expert_mlp_dim', moe.expert_mlp_dim)
    _check_non_negative('model.moe.capacity_factor', moe.capacity_factor, 'dropless')
    _check_non_negative('model.moe.load_balance_weight', moe.load_balance_weight, 'off')
    _check_non_negative('model.moe.router_z_weight', moe.router_z_weight, 'off')
    _check_choice('model.moe.impl', moe.impl, MOE_IMPLS)
    if moe.impl == 'ragged' and moe.capacity_factor:
      raise ConfigError(f'model.moe.impl=ragged never drops a token, so it cannot honour '
                        f'model.moe.capacity_factor={moe.capacity_factor}: set it to 0 '
                        '(dropless) or use model.moe.impl=capacity.')
    if moe.shared_expert_dim < 0:
      raise ConfigError(f'model.moe.shared_expert_dim={moe.shared_expert_dim} must be 0 (no '
                        'shared expert) or positive.')
  if model.match_baseline_params and moe.num_experts:
    raise ConfigError('model.match_baseline_params narrows the dense MLP; it does not apply to '
                      'a mixture-of-experts model (model.moe.num_experts > 0).')
  if model.match_baseline_params:
    from gated_attention.model import mlp_width  # The model's own arithmetic.
    if mlp_width(model) < 1:
      raise ConfigError(f'model.match_baseline_params narrows model.mlp_dim={model.mlp_dim} to '
                        f'{mlp_width(model)} to pay for the gate\'s parameters: raise mlp_dim or '
                        'set match_baseline_params=False.')

  data = config.data
  _check_choice('data.source', data.source, DATA_SOURCES)
  if data.source in ('text_files', 'array_record') and not data.path:
    raise ConfigError(f'data.path is empty; data.source={data.source!r} needs a file glob.')
  if data.path and data.source not in ('text_files', 'array_record'):
    raise ConfigError(f'data.path={data.path!r} is read by data.source text_files or '
                      f'array_record, not {data.source!r}: set data.source, or leave data.path '
                      'empty.')
  if data.eval_path and data.source != 'array_record':
    raise ConfigError(f'data.eval_path={data.eval_path!r} is read by data.source=array_record '
                      f'only ({data.source!r} holds out documents of data.path): leave it empty.')
  if data.source == 'bigram_backcopy':
    if data.tokenizer != 'byte':
      raise ConfigError(f'data.tokenizer={data.tokenizer!r}: data.source=bigram_backcopy '
                        "generates byte sequences; leave data.tokenizer='byte'.")
    triggers = data.bigram_backcopy.num_triggers
    if not 0 <= triggers < 256:
      raise ConfigError(f'data.bigram_backcopy.num_triggers={triggers} must be in [0, 256): '
                        'triggers are bytes, and the first token must not be one.')
  _check_positive('data.seq_len', data.seq_len)
  if model.attention_impl == 'splash' and data.seq_len % SPLASH_BLOCK:
    raise ConfigError(f'data.seq_len={data.seq_len}: model.attention_impl=splash needs a '
                      f'multiple of {SPLASH_BLOCK} (the kernel\'s block length).')
  if model.loss_chunk < 0 or (model.loss_chunk and data.seq_len % model.loss_chunk):
    raise ConfigError(f'model.loss_chunk={model.loss_chunk} must be 0 (all positions at once) '
                      f'or divide data.seq_len={data.seq_len}.')
  _check_positive('data.batch_size', data.batch_size)
  if not 0 < data.heldout_fraction < 1:
    raise ConfigError(f'data.heldout_fraction={data.heldout_fraction} must be in (0, 1).')
  _check_tokenizer(config)

  train = config.train
  for key in ('steps', 'learning_rate', 'log_every', 'checkpoint_every', 'keep_checkpoints',
              'loss_spike_window', 'loss_spike_margin', 'microbatches', 'grad_clip'):
    _check_positive(f'train.{key}', train[key])
  for key in ('b1', 'b2'):
    if not 0 <= train[key] < 1:
      raise ConfigError(f'train.{key}={train[key]} must be in [0, 1) (an Adam moment decay).')
  _check_non_negative('train.peak_flops_per_device', train.peak_flops_per_device,
                      'look the device up')
  _check_non_negative('train.weight_decay', train.weight_decay)
  _check_non_negative('train.profile_steps', train.profile_steps, 'no profile')
  _check_non_negative('train.profile_after', train.profile_after)
  for key, seed in (('train.seed', train.seed),
                    ('data.bigram_backcopy.seed', data.bigram_backcopy.seed)):
    if seed < 0:
      raise ConfigError(f'{key}={seed} must be 0 or positive (seeds are unsigned).')
  if not 0 <= train.warmup_steps < train.steps:
    raise ConfigError(f'train.warmup_steps={train.warmup_steps} must be in [0, train.steps='
                      f'{train.steps}): the cosine decay to train.min_learning_rate at the last '
                      'step needs a step after the warmup.')
  if not 0 <= train.min_learning_rate <= train.learning_rate:
    raise ConfigError(f'train.min_learning_rate={train.min_learning_rate} must be in '
                      f'[0, train.learning_rate={train.learning_rate}].')
  _check_choice('train.on_nonfinite', train.on_nonfinite, ON_NONFINITE)
  if train.init_from_optimizer and not train.init_from:
    raise ConfigError('train.init_from_optimizer=True needs train.init_from=DIR[:STEP].')
  _check_positive('eval.batches', config.eval.batches)
  _check_positive('eval.batch_size', config.eval.batch_size)
  if not 1 <= config.eval.analysis_batches <= config.eval.batches:
    raise ConfigError(f'eval.analysis_batches={config.eval.analysis_batches} must be in '
                      f'[1, eval.batches={config.eval.batches}].')
