"""What a resume may change: key by key, by the policy table, with exact messages."""

import pathlib

import pytest

from gated_attention import config as config_lib
from gated_attention import resume
from gated_attention.checkpoint import CheckpointError
from gated_attention.tokenizer import save_byte_tokenizer

CHECKPOINT = pathlib.Path('/runs/a/checkpoints/4')


def _saved(**changes):
  """A saved config (the plain dict a checkpoint holds) of the base config with changes."""
  config = config_lib.base_config()
  for key, value in changes.items():
    *parents, name = key.split('.')
    node = config
    for parent in parents:
      node = node[parent]
    node[name] = value
  return resume.plain(config)


def test_only_the_changed_key_is_named():
  current = config_lib.base_config()
  current.model.d_model = 256
  current.lock()
  with pytest.raises(CheckpointError) as error:
    resume.check_resume(_saved(), current, CHECKPOINT, allow_data_change=True)
  assert str(error.value) == (f"Cannot resume {CHECKPOINT}: its model differs (model.d_model: "
                              "128 -> 256). Use another --workdir, or the checkpoint's values.")


def test_a_key_the_saved_config_lacks_counts_as_its_default():
  saved = _saved()
  del saved['model']['rope_theta'], saved['train']['microbatches']
  assert resume.differences(saved, resume.plain(config_lib.base_config())) == {}
  current = config_lib.base_config()
  current.model.rope_theta = 5e5
  assert resume.differences(saved, resume.plain(current)) == {
      'model.rope_theta': (10_000.0, 5e5)}


@pytest.mark.parametrize('key, value, kind', [
    ('model.gate.activation', 'silu', resume.MODEL),
    ('model.moe.num_experts', 4, resume.MODEL),
    ('model.attention_impl', 'xla', resume.ALLOWED),
    ('data.batch_size', 32, resume.DATA_ORDER),
    ('data.seq_len', 64, resume.DATA_ORDER),
    ('train.seed', 3, resume.DATA_ORDER),
    ('data.eval_path', '/held/out', resume.ALLOWED),
    ('train.learning_rate', 1e-2, resume.ALLOWED),
    ('train.steps', 1000, resume.ALLOWED),
    ('mesh.fsdp', 2, resume.ALLOWED),
])
def test_each_key_follows_its_policy(key, value, kind):
  current = config_lib.base_config()
  current.update_from_flattened_dict({key: value})
  changes = {key: (resume.flatten(_saved())[key], value)}
  assert resume.policy(key) == kind
  if kind == resume.MODEL:
    with pytest.raises(CheckpointError, match='its model differs'):
      resume.check_resume(_saved(), current, CHECKPOINT, allow_data_change=True)
  elif kind == resume.DATA_ORDER:
    with pytest.raises(CheckpointError, match=f'its data order differs \\({key}: '):
      resume.check_resume(_saved(), current, CHECKPOINT, allow_data_change=False)
    assert resume.check_resume(_saved(), current, CHECKPOINT, allow_data_change=True) == changes
  else:
    assert resume.check_resume(_saved(), current, CHECKPOINT, allow_data_change=False) == changes


def test_another_tokenizer_is_another_model_unless_its_vocabulary_is_the_same(tmp_path):
  save_byte_tokenizer(tmp_path)  # The byte tokenizer as a tokenizer.json: the same ids.
  for tokenizer, refused in ((str(tmp_path / 'tokenizer.json'), False), ('none', True)):
    current = config_lib.base_config()
    current.data.tokenizer = tokenizer
    if refused:
      with pytest.raises(CheckpointError, match="its model differs \\(data.tokenizer: 'byte' ->"):
        resume.check_resume(_saved(), current, CHECKPOINT, allow_data_change=True)
    else:
      assert resume.check_resume(_saved(), current, CHECKPOINT, allow_data_change=False) == {
          'data.tokenizer': ('byte', tokenizer)}


def test_implementation_choices_are_free():
  for key in ('model.attention_impl', 'model.remat', 'model.scan_layers', 'model.moe.impl'):
    assert resume.policy(key) == resume.ALLOWED
  assert resume.policy('model.moe.top_k') == resume.MODEL


def test_other_training_data_under_the_same_config_is_a_data_order_change():
  """The data's fingerprints (saved, current) compared as one more key; unknown (None, from a
  checkpoint saved before fingerprints) is no change."""
  current = config_lib.base_config()
  contents = ('1,000 examples, sha256 aaaaaaaaaaaa', '990 examples, sha256 bbbbbbbbbbbb')
  with pytest.raises(CheckpointError) as error:
    resume.check_resume(_saved(), current, CHECKPOINT, False, contents)
  assert str(error.value) == (
      f"Cannot resume {CHECKPOINT}: its data order differs (data.contents: '1,000 examples, "
      "sha256 aaaaaaaaaaaa' -> '990 examples, sha256 bbbbbbbbbbbb'; pass --allow_data_change if "
      "that is intended). Use another --workdir, or the checkpoint's values.")
  assert resume.check_resume(_saved(), current, CHECKPOINT, True, contents) == {
      'data.contents': contents}
  for same in ((None, contents[1]), (contents[0], contents[0])):
    assert resume.check_resume(_saved(), current, CHECKPOINT, False, same) == {}
  # The held-out split's: allowed (its losses are only not comparable), and recorded.
  assert resume.check_resume(_saved(), current, CHECKPOINT, False, (None, None), contents) == {
      'data.heldout_contents': contents}
