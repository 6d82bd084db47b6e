"""What a resumed run may change from the config its checkpoint was trained with.

`RESUME_POLICY` maps config keys (a dotted prefix; the longest one that matches decides) to:
  MODEL       refused: the checkpoint holds another model's parameters;
  DATA_ORDER  refused unless the change is declared intended (--allow_data_change): the saved
              data position counts batches of the old order. When it is, the position is
              translated by examples consumed (`data.translate_position`);
  ALLOWED     the schedule, optimizer, logging, mesh, evaluation, and implementation choices
              that compute the same function with the same parameters.
Configs are compared as plain dicts, key by key; a key the saved config lacks (added to the code
later) counts as its `base_config()` default. The training data itself is compared too, by its
fingerprint (`data.contents`, a DATA_ORDER change): the same config can read other text (files
edited, another Python's standard library). So is the held-out split's (`data.heldout_contents`,
allowed and recorded: held-out losses before and after it are not comparable, and with text sources
documents may have moved between the splits). Every start and resume appends one line to
WORKDIR/history.jsonl: when, where, which command, from which step, what changed, and any data
translation.
"""

import json
import pathlib

from gated_attention import config as config_lib
from gated_attention import tokenizer as tokenizer_lib
from gated_attention import workdir as workdir_lib
from gated_attention.checkpoint import CheckpointError

MODEL, DATA_ORDER, ALLOWED = 'model', 'data order', 'allowed'
DATA_CONTENTS = 'data.contents'  # Not a config key: the training data's fingerprint.
HELDOUT_CONTENTS = 'data.heldout_contents'  # Nor this: the held-out split's.

RESUME_POLICY = {
    'model': MODEL,
    'model.attention_impl': ALLOWED,
    'model.remat': ALLOWED,
    'model.scan_layers': ALLOWED,
    'model.moe.impl': ALLOWED,
    'data': DATA_ORDER,
    'data.tokenizer': MODEL,  # Unless its vocabulary is the same (`_kind`).
    'data.eval_path': ALLOWED,  # The held-out split only.
    HELDOUT_CONTENTS: ALLOWED,
    'train.seed': DATA_ORDER,  # On resume it seeds only the shuffle: parameters are restored.
}


def plain(config) -> dict:
  """A ConfigDict (locked or not) as the plain JSON dict a checkpoint stores."""
  return json.loads(config.to_json())


def flatten(tree: dict, prefix: str = '') -> dict:
  """{'model.gate.position': 'sdpa', ...} for a nested dict."""
  flat = {}
  for key, value in tree.items():
    if isinstance(value, dict):
      flat.update(flatten(value, f'{prefix}{key}.'))
    else:
      flat[f'{prefix}{key}'] = value
  return flat


def policy(key: str) -> str:
  parts = key.split('.')
  for end in range(len(parts), 0, -1):
    if '.'.join(parts[:end]) in RESUME_POLICY:
      return RESUME_POLICY['.'.join(parts[:end])]
  return ALLOWED


def _kind(key: str, change: tuple) -> str:
  """The policy of one change: another tokenizer is another model unless its vocabulary is
  the same (allowed); one that cannot be read to tell counts as a data change."""
  if key != 'data.tokenizer':
    return policy(key)
  same = tokenizer_lib.same_ids(*change)
  return ALLOWED if same else MODEL if same is False else DATA_ORDER


def differences(saved: dict, current: dict) -> dict[str, tuple]:
  """{key: (saved value, current value)} for each key of `current` whose value differs."""
  defaults = flatten(plain(config_lib.base_config()))
  saved, current = flatten(saved), flatten(current)
  before = {key: saved.get(key, defaults.get(key)) for key in current}
  return {key: (before[key], value) for key, value in current.items() if before[key] != value}


def describe(changes: dict) -> str:
  """'key: old -> new, ...' for differences as `differences` returns them."""
  return ', '.join(f'{key}: {old!r} -> {new!r}' for key, (old, new) in changes.items())


def check_resume(saved: dict, config, checkpoint: pathlib.Path, allow_data_change: bool,
                 data_contents: tuple = (None, None),
                 heldout_contents: tuple = (None, None)) -> dict[str, tuple]:
  """The differences between the saved config and `config`, and between the training data's
  and the held-out split's fingerprints (saved, current: `data.fingerprint`; None where
  unknown) as `data.contents` and `data.heldout_contents`; raises CheckpointError naming every
  refused one, grouped by why."""
  changes = differences(saved, plain(config))
  for key, (old, new) in ((DATA_CONTENTS, data_contents), (HELDOUT_CONTENTS, heldout_contents)):
    if None not in (old, new) and old != new:
      changes[key] = (old, new)
  kinds = {key: _kind(key, change) for key, change in changes.items()}
  model = {k: v for k, v in changes.items() if kinds[k] == MODEL}
  data = {k: v for k, v in changes.items() if kinds[k] == DATA_ORDER and not allow_data_change}
  reasons = ([f'its model differs ({describe(model)})'] if model else []) + (
      [f'its data order differs ({describe(data)}; pass --allow_data_change if that is intended)']
      if data else [])
  if reasons:
    raise CheckpointError(f'Cannot resume {checkpoint}: ' + ', and '.join(reasons)
                          + ". Use another --workdir, or the checkpoint's values.")
  return changes


def append_history(workdir, step: int, changes: dict, data_position: dict | None,
                   init_from: dict | None = None) -> None:
  """Appends this start (step 0) or resume to WORKDIR/history.jsonl; a start from another run's
  parameters (train.init_from) records that source and its changes from the source's config."""
  record = {**workdir_lib.this_process(), 'step': step,
            'changes': {key: list(values) for key, values in changes.items()},
            'data_position': data_position}
  if init_from is not None:
    record['init_from'] = init_from
  with (pathlib.Path(workdir) / 'history.jsonl').open('a') as history:
    history.write(json.dumps(record) + '\n')
