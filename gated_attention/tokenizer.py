"""Tokenizers behind one interface: the byte-level default and any Hugging Face `tokenizer.json`.

`config.data.tokenizer` names one:
  'byte'   the 256 byte values, then PAD 256, BOS 257, EOS 258 (259 ids): no file, any text.
  'none'   the model has no tokenizer (an imported checkpoint that came without one): it reads
           token ids only (array_record data, `generate --prompt_ids`).
  a path   a tokenizer.json, read with the `tokenizers` library. Its special tokens (bos_token,
           eos_token, pad_token) come from the tokenizer_config.json beside it, as in a Hugging
           Face model directory.

Every training example and every prompt starts with `bos_id`. A tokenizer without a BOS token
(Qwen's) starts them with its EOS token, the document separator it was trained with.
"""

import functools
import json
import pathlib
import sys

import numpy as np
from tqdm import tqdm

from gated_attention.config import ConfigError

BYTE, NONE = 'byte', 'none'
_ENCODE_BATCH = 64  # Documents per call of the tokenizers library's parallel batch encoder.


class ByteTokenizer:
  """UTF-8 bytes as ids 0..255, then PAD, BOS and EOS."""
  vocab_size = 259
  pad_id, bos_id, eos_id = 256, 257, 258
  # As its tokenizer.json names them, in id order.
  special_tokens = {'<pad>': pad_id, '<s>': bos_id, '</s>': eos_id}

  def encode(self, text: str | bytes) -> np.ndarray:
    """Token ids (uint16) of text, no special ids."""
    data = text.encode() if isinstance(text, str) else text
    return np.frombuffer(data, dtype=np.uint8).astype(np.uint16)

  def encode_documents(self, documents) -> list[np.ndarray]:
    """encode() of each (name, bytes) document."""
    return [self.encode(text) for _, text in documents]

  def decode(self, ids) -> str:
    """Text of token ids; special ids are dropped."""
    return bytes(int(i) for i in ids if i < 256).decode('utf-8', errors='replace')

  def vocabulary(self) -> dict[str, int]:
    """{token: id}, as its tokenizer.json (save_byte_tokenizer) names them."""
    return {**{char: i for i, char in enumerate(_gpt2_byte_chars())}, **self.special_tokens}


class HuggingFaceTokenizer:
  """A tokenizer.json (and the tokenizer_config.json beside it, if any) read with `tokenizers`."""

  def __init__(self, path):
    from tokenizers import Tokenizer  # Only where a tokenizer file is named.
    self.path = pathlib.Path(path)
    try:
      self._tokenizer = Tokenizer.from_file(str(self.path))
    except Exception as error:  # The Rust library raises plain Exceptions for unreadable files.
      raise ConfigError(f'data.tokenizer={str(path)!r}: cannot read it as a tokenizer.json '
                        f'({str(error).splitlines()[0][:200]}); give a Hugging Face '
                        f'tokenizer.json, {BYTE!r} or {NONE!r}.') from None
    # The largest id + 1, not the count of tokens: a vocabulary may have gaps.
    self.vocab_size = max(self._tokenizer.get_vocab(with_added_tokens=True).values()) + 1
    # Text is text: a literal '</s>' or '<|endoftext|>' in a document is not the special token.
    self._tokenizer.encode_special_tokens = True
    config_path = self.path.parent / 'tokenizer_config.json'
    special = _special_tokens(config_path)
    self.eos_id = self._token_id(special.get('eos_token'))
    if self.eos_id is None:
      where = (f'{config_path} names no eos_token in the vocabulary' if config_path.exists()
               else f'no {config_path.name} beside it names the eos_token')
      raise ConfigError(f'data.tokenizer={str(path)!r}: {where}; documents are separated and '
                        'generation stops with it.')
    bos_id = self._token_id(special.get('bos_token'))
    self.bos_id = self.eos_id if bos_id is None else bos_id
    pad_id = self._token_id(special.get('pad_token'))
    # A PAD that is also EOS or BOS (Qwen's) must not hide those targets from the loss.
    self.pad_id = None if pad_id in (self.eos_id, self.bos_id) else pad_id

  def _token_id(self, token) -> int | None:
    return None if token is None else self._tokenizer.token_to_id(token)

  def vocabulary(self) -> dict[str, int]:
    """{token: id}, added tokens included."""
    return self._tokenizer.get_vocab(with_added_tokens=True)

  def encode(self, text: str | bytes) -> np.ndarray:
    """Token ids (int32) of text (UTF-8 if bytes), no special ids added; special tokens'
    names in the text are read as text."""
    text = text.decode('utf-8', errors='replace') if isinstance(text, bytes) else text
    return np.asarray(self._tokenizer.encode(text, add_special_tokens=False).ids, np.int32)

  def encode_documents(self, documents) -> list[np.ndarray]:
    """encode() of each (name, bytes) document, in parallel batches, with a progress bar; a
    warning names the documents that are not UTF-8 (their invalid bytes read as U+FFFD)."""
    texts = [text.decode('utf-8', errors='replace') for _, text in documents]
    invalid = [name for (name, raw), text in zip(documents, texts)
               if '\ufffd' in text and text.encode('utf-8') != raw]
    if invalid:
      print(f'warning: {len(invalid)} of {len(texts)} documents are not valid UTF-8, their '
            f'invalid bytes read as U+FFFD (a tokenizer.json reads text): {invalid[0]}'
            + (f' and {len(invalid) - 1} more' if len(invalid) > 1 else ''),
            file=sys.stderr, flush=True)
    ids = []
    for start in tqdm(range(0, len(texts), _ENCODE_BATCH), desc='tokenize', unit='batch',
                      file=sys.stdout, leave=False, disable=len(texts) <= _ENCODE_BATCH):
      encodings = self._tokenizer.encode_batch(texts[start:start + _ENCODE_BATCH],
                                               add_special_tokens=False)
      ids.extend(np.asarray(encoding.ids, np.int32) for encoding in encodings)
    return ids

  def decode(self, ids) -> str:
    """Text of token ids; special tokens are dropped."""
    return self._tokenizer.decode([int(i) for i in ids], skip_special_tokens=True)


def _special_tokens(path: pathlib.Path) -> dict:
  """{'bos_token': str | None, ...} from a tokenizer_config.json ({} when there is none)."""
  if not path.exists():
    return {}
  try:
    config = json.loads(path.read_text())
  except json.JSONDecodeError as error:
    raise ConfigError(f'{path} is not valid JSON ({error}).') from None
  # A token is written as its text or as {"content": text, ...}.
  return {key: value['content'] if isinstance(value, dict) else value
          for key, value in config.items() if key in ('bos_token', 'eos_token', 'pad_token')}


@functools.lru_cache(maxsize=4)
def load_tokenizer(name: str) -> ByteTokenizer | HuggingFaceTokenizer | None:
  """The tokenizer `config.data.tokenizer` names (None for 'none'); read once per process."""
  if name == BYTE:
    return ByteTokenizer()
  if name == NONE:
    return None
  if not pathlib.Path(name).is_file():
    raise ConfigError(f'data.tokenizer={name!r} is not a file; give {BYTE!r}, {NONE!r} or the '
                      'path of a Hugging Face tokenizer.json.')
  return HuggingFaceTokenizer(name)


def same_ids(name: str, other: str) -> bool | None:
  """Whether two data.tokenizer values mean the same token by each id: True for the same name
  or vocabularies alike ('byte' and its tokenizer.json, say), False for other vocabularies (or
  'none' against a tokenizer), None where one cannot be read to tell."""
  if name == other:
    return True
  try:
    tokenizers = [load_tokenizer(name), load_tokenizer(other)]
  except (ConfigError, OSError, ValueError):
    return None
  return None not in tokenizers and tokenizers[0].vocabulary() == tokenizers[1].vocabulary()


def pad_id(name: str) -> int | None:
  """The id the loss ignores for the tokenizer `name` (None: every target counts)."""
  tokenizer = load_tokenizer(name)
  return None if tokenizer is None else tokenizer.pad_id


def _gpt2_byte_chars() -> list[str]:
  """The printable character that byte-level BPE (GPT-2's, the `tokenizers` ByteLevel
  pre-tokenizer's) writes for each byte 0..255: printable Latin-1 bytes stand for themselves,
  the others take the code points from 256 upwards in byte order."""
  printable = set(range(ord('!'), ord('~') + 1)) | set(range(0xA1, 0xAD)) | set(range(0xAE, 0x100))
  chars, extra = [], 0
  for byte in range(256):
    if byte in printable:
      chars.append(chr(byte))
    else:
      chars.append(chr(256 + extra))
      extra += 1
  return chars


def save_byte_tokenizer(directory) -> None:
  """Writes the byte tokenizer as a Hugging Face tokenizer.json and tokenizer_config.json (byte
  b is id b; <pad>, <s>, </s> are 256, 257, 258; encoding with special tokens puts <s> first),
  so transformers, lm-evaluation-harness and vLLM tokenize text as this project does."""
  from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors
  byte = ByteTokenizer()
  chars = _gpt2_byte_chars()
  # A BPE with the 256 byte characters and no merges reads every byte as its own token.
  tokenizer = Tokenizer(models.BPE(vocab={char: i for i, char in enumerate(chars)}, merges=[]))
  tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
  tokenizer.decoder = decoders.ByteLevel()
  tokenizer.add_special_tokens([AddedToken(name, special=True) for name in byte.special_tokens])
  tokenizer.post_processor = processors.TemplateProcessing(
      single='<s> $A', special_tokens=[('<s>', byte.bos_id)])
  directory = pathlib.Path(directory)
  tokenizer.save(str(directory / 'tokenizer.json'))
  (directory / 'tokenizer_config.json').write_text(json.dumps({
      'tokenizer_class': 'PreTrainedTokenizerFast', 'bos_token': '<s>', 'eos_token': '</s>',
      'pad_token': '<pad>', 'split_special_tokens': True}, indent=2))  # '<s>' in text is text.
