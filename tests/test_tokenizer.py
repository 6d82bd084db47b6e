"""Tokenizers: the byte tokenizer, a Hugging Face tokenizer.json and its special tokens, their
use in the data pipeline, and the start-up checks."""

import json
import pathlib
import subprocess
import sys

import numpy as np
import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from gated_attention import config as config_lib
from gated_attention import data
from gated_attention.config import ConfigError
from gated_attention.tokenizer import (ByteTokenizer, HuggingFaceTokenizer, load_tokenizer,
                                       save_byte_tokenizer)

REPO = pathlib.Path(__file__).resolve().parents[1]
TEXT = 'def gated(x):\n\treturn σ(x) * x  # €\n'
DOCUMENTS = [(f'doc{i}.py', (f'def f{i}(x):\n    return x * {i}\n' * (3 + i)).encode())
             for i in range(6)]


def _bpe(directory, special: dict) -> str:
  """A small BPE tokenizer.json trained here on DOCUMENTS, with a tokenizer_config.json naming
  `special` tokens; returns the tokenizer.json path."""
  tokenizer = Tokenizer(models.BPE(unk_token='<unk>'))
  tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  tokenizer.decoder = decoders.ByteLevel()
  trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=['<unk>', '<|endoftext|>', '<s>'],
                                initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
  tokenizer.train_from_iterator([text.decode() for _, text in DOCUMENTS], trainer)
  tokenizer.save(str(directory / 'tokenizer.json'))
  (directory / 'tokenizer_config.json').write_text(json.dumps(special))
  return str(directory / 'tokenizer.json')


def test_byte_tokenizer_round_trip():
  byte = ByteTokenizer()
  ids = byte.encode(TEXT)
  np.testing.assert_array_equal(ids, list(TEXT.encode()))
  assert byte.decode([byte.bos_id, *ids, byte.eos_id, byte.pad_id]) == TEXT


def test_the_byte_tokenizer_written_as_tokenizer_json_reads_text_the_same(tmp_path):
  save_byte_tokenizer(tmp_path)
  byte, written = ByteTokenizer(), HuggingFaceTokenizer(tmp_path / 'tokenizer.json')
  np.testing.assert_array_equal(written.encode(TEXT), byte.encode(TEXT))
  assert (written.bos_id, written.eos_id, written.pad_id, written.vocab_size) == (
      byte.bos_id, byte.eos_id, byte.pad_id, byte.vocab_size)
  assert written.decode([byte.bos_id, *byte.encode(TEXT), byte.eos_id]) == TEXT


def test_special_token_names_in_text_are_text_here_and_in_transformers(tmp_path):
  """'<s>' written in a document is three bytes, for the byte tokenizer, for its tokenizer.json
  read here, and for transformers reading the exported files (special tokens kept out of data)."""
  from transformers import AutoTokenizer  # Test dependency only.
  text = 'a <s> b </s> c <pad> d'
  save_byte_tokenizer(tmp_path)
  expected = list(text.encode())
  np.testing.assert_array_equal(ByteTokenizer().encode(text), expected)
  np.testing.assert_array_equal(HuggingFaceTokenizer(tmp_path / 'tokenizer.json').encode(text),
                                expected)
  assert AutoTokenizer.from_pretrained(tmp_path)(text, add_special_tokens=False)['input_ids'] == (
      expected)


def test_the_vocabulary_size_is_the_largest_id_plus_one(tmp_path):
  """A tokenizer.json whose ids have gaps: the model needs the largest id + 1 rows."""
  tokenizer = Tokenizer(models.WordLevel({'a': 0, 'b': 1, '<unk>': 2, '</s>': 70_000},
                                         unk_token='<unk>'))
  tokenizer.save(str(tmp_path / 'tokenizer.json'))
  (tmp_path / 'tokenizer_config.json').write_text(json.dumps({'eos_token': '</s>'}))
  assert HuggingFaceTokenizer(tmp_path / 'tokenizer.json').vocab_size == 70_001


def test_documents_that_are_not_utf8_are_named(tmp_path, capsys):
  tokenizer = HuggingFaceTokenizer(_bpe(tmp_path, {'eos_token': '<|endoftext|>'}))
  latin1 = ('latin1.txt', 'café naïve'.encode('latin-1'))
  ids = tokenizer.encode_documents([DOCUMENTS[0], latin1, ('replacement.txt', '\ufffd'.encode())])
  assert len(ids) == 3
  assert ('warning: 1 of 3 documents are not valid UTF-8, their invalid bytes read as U+FFFD '
          '(a tokenizer.json reads text): latin1.txt\n') in capsys.readouterr().err


def test_special_tokens_come_from_tokenizer_config(tmp_path):
  """Qwen's convention: no BOS (sequences start with EOS), PAD equal to EOS (so nothing is
  masked from the loss); a distinct PAD is masked."""
  path = _bpe(tmp_path, {'bos_token': None, 'eos_token': '<|endoftext|>',
                         'pad_token': {'content': '<|endoftext|>'}})
  tokenizer = HuggingFaceTokenizer(path)
  assert tokenizer.bos_id == tokenizer.eos_id == 1 and tokenizer.pad_id is None
  (tmp_path / 'tokenizer_config.json').write_text(json.dumps(
      {'bos_token': '<s>', 'eos_token': '<|endoftext|>', 'pad_token': '<unk>'}))
  tokenizer = HuggingFaceTokenizer(path)
  assert (tokenizer.bos_id, tokenizer.eos_id, tokenizer.pad_id) == (2, 1, 0)
  (tmp_path / 'tokenizer_config.json').unlink()
  with pytest.raises(ConfigError, match='no tokenizer_config.json beside it names the eos_token'):
    HuggingFaceTokenizer(path)


def test_token_chunks_of_a_tokenizer_are_its_document_ids_between_eos(tmp_path):
  tokenizer = HuggingFaceTokenizer(_bpe(tmp_path, {'eos_token': '<|endoftext|>'}))
  chunks = data.TokenChunks(DOCUMENTS, seq_len=8, name='test', tokenizer=tokenizer)
  stream = np.concatenate([np.append(tokenizer.encode(text), tokenizer.eos_id)
                           for _, text in DOCUMENTS])
  assert len(stream) < sum(len(text) for _, text in DOCUMENTS) / 2  # Merges did happen.
  assert len(chunks) == len(stream) // 8
  for i in range(len(chunks)):
    np.testing.assert_array_equal(chunks[i], [tokenizer.bos_id, *stream[8 * i:8 * i + 8]])
  assert tokenizer.decode(stream[:len(tokenizer.encode(DOCUMENTS[0][1]))]) == (
      DOCUMENTS[0][1].decode())


def test_start_up_checks_name_the_tokenizer(tmp_path):
  config = config_lib.base_config('tiny')
  config.data.tokenizer = str(tmp_path / 'missing.json')
  with pytest.raises(ConfigError, match='data.tokenizer=.*missing.json.* is not a file'):
    config_lib.validate(config)
  (tmp_path / 'broken.json').write_text('{"not": "a tokenizer"}')
  config.data.tokenizer = str(tmp_path / 'broken.json')
  with pytest.raises(ConfigError, match='cannot read it as a tokenizer.json'):
    config_lib.validate(config)
  config.data.tokenizer = 'byte'
  config.model.vocab_size = 200
  with pytest.raises(ConfigError, match="model.vocab_size=200 is smaller than the 259 ids of "
                                        "data.tokenizer='byte'"):
    config_lib.validate(config)
  config.model.vocab_size, config.data.tokenizer = 384, 'none'
  config_lib.validate(config)  # A model without a tokenizer is valid; reading text is not.
  assert load_tokenizer('none') is None
  with pytest.raises(data.DataError, match="data.tokenizer='none': data.source='embedded' reads "
                                           'text'):
    data.load_split(config.data, 'heldout', config.model.vocab_size)


def test_prepare_data_with_a_tokenizer(tmp_path):
  path = _bpe(tmp_path, {'eos_token': '<|endoftext|>'})
  for name, text in DOCUMENTS:
    (tmp_path / name).write_bytes(text)
  result = subprocess.run(
      [sys.executable, '-m', 'experiments.prepare_data', f'--input={tmp_path}/*.py',
       f'--output_dir={tmp_path / "out"}', '--seq_len=8', f'--tokenizer={path}',
       '--heldout_fraction=0.3'], cwd=REPO, capture_output=True, text=True, timeout=120)
  assert result.returncode == 0, result.stderr
  records = config_lib.base_config('tiny').data
  records.update(source='array_record', path=str(tmp_path / 'out' / 'train.array_record'),
                 eval_path=str(tmp_path / 'out' / 'heldout.array_record'), seq_len=8)
  text = config_lib.base_config('tiny').data
  text.update(source='text_files', path=f'{tmp_path}/*.py', seq_len=8, heldout_fraction=0.3,
              tokenizer=path)
  vocab_size = load_tokenizer(path).vocab_size
  for split in ('train', 'heldout'):
    written = data.load_split(records, split, vocab_size)
    expected = data.load_split(text, split, vocab_size)
    assert len(written) == len(expected) > 0
    np.testing.assert_array_equal(written[0], expected[0])
    assert written[0][0] == 1  # BOS: this tokenizer has none, so its EOS.
