"""Data: document sources, tokenized by `config.data.tokenizer`, and deterministic grain pipelines.

Sources (`config.data.source`):
  embedded      the Python standard library's own sources, on every machine with Python: the
                default corpus, no download;
  text_files    the user's text files, `config.data.path` a glob;
  array_record  pre-tokenized examples for corpora too large to tokenize on the fly: each record
                is seq_len + 1 little-endian int32 token ids (`experiments/prepare_data.py`
                writes them). `data.path` is the training glob, `data.eval_path` the held-out one.
  bigram_backcopy  the synthetic Bigram-Backcopy task, on which an attention sink forms in
                minutes (`gated_attention/bigram_backcopy.py`, keys `data.bigram_backcopy.*`).

For the text sources whole documents (files) are assigned to the held-out split by a seeded
permutation, so no document is in both splits (two files with the same contents can be). Each
split is one stream of [document tokens, EOS] cut into chunks of seq_len tokens; every example
is BOS followed by one chunk, so the model's first token is always BOS (see
`gated_attention.tokenizer`). Inputs are example[:-1] and targets example[1:].
"""

import functools
import glob
import hashlib
import os
import pathlib
import sys
import sysconfig

import grain
import numpy as np
from tqdm import tqdm

from gated_attention.checkpoint import whole_file
from gated_attention.distributed import log
from gated_attention.tokenizer import load_tokenizer


class DataError(ValueError):
  """Input data that cannot be used; the message names the path or key."""


class ShortSplitError(DataError):
  """A split holds fewer tokens than one example takes; `tokens` is how many it holds."""

  def __init__(self, message: str, tokens: int):
    super().__init__(message)
    self.tokens = tokens


@functools.lru_cache(maxsize=1)
def embedded_documents() -> tuple[tuple[str, bytes], ...]:
  """The standard library's .py files (no site-packages), sorted by path; read once per process."""
  root = pathlib.Path(sysconfig.get_paths()['stdlib'])
  paths = sorted(p for p in root.rglob('*.py') if 'site-packages' not in p.parts)
  if not paths:
    raise DataError(f'No .py files under {root}: the embedded corpus needs the Python sources.')
  return tuple((str(p.relative_to(root)), p.read_bytes()) for p in paths)


def _files(pattern: str) -> list[str]:
  """The files (not directories) a glob matches, sorted; `**` spans directories."""
  return sorted(p for p in glob.glob(pattern, recursive=True) if pathlib.Path(p).is_file())


def text_file_documents(pattern: str, key: str = 'data.path') -> list[tuple[str, bytes]]:
  """Files matching the glob `pattern` (recursive ** allowed; `key` names it in errors), sorted
  by path."""
  paths = _files(pattern)
  if not paths:
    raise DataError(f'{key}={pattern!r} matches no files' + _directory_hint(pattern))
  documents = []
  for path in paths:
    try:
      documents.append((path, pathlib.Path(path).read_bytes()))
    except OSError as error:
      raise DataError(f'Cannot read data file {path}: {error.strerror}.') from None
  return documents


def _directory_hint(pattern: str) -> str:
  """The end of a 'matches no files' message: how to name a directory's files."""
  if pathlib.Path(pattern).is_dir():
    files = str(pathlib.Path(pattern) / '**' / '*')
    return f' (it is a directory: give a glob of its files, e.g. {files!r}).'
  return '.'


def split_documents(documents, heldout_fraction: float, seed: int, where: str = 'data.path'):
  """(train, heldout) lists: a seeded choice of whole documents goes to heldout, the fraction
  rounded to at least one document and at most all but one (said when it moves the count);
  `where` names the documents' source in messages."""
  if len(documents) < 2:
    raise DataError(f'{where} gives {len(documents)} document(s): a held-out split needs at '
                    'least 2 (whole files are held out).')
  order = np.random.default_rng(seed).permutation(len(documents))
  rounded = round(heldout_fraction * len(documents))
  num_heldout = min(len(documents) - 1, max(1, rounded))
  if num_heldout != rounded:
    _log_once(f'data.heldout_fraction={heldout_fraction} of the {len(documents)} documents of '
              f'{where} rounds to {rounded}; {num_heldout} held out instead (each split needs '
              'a whole document).')
  heldout = set(order[:num_heldout].tolist())
  train = [d for i, d in enumerate(documents) if i not in heldout]
  return train, [d for i, d in enumerate(documents) if i in heldout]


@functools.cache
def _log_once(message: str) -> None:
  log(message)


class TokenChunks:
  """Random-access examples [BOS, chunk of seq_len stream tokens] as int32 [seq_len + 1]."""

  def __init__(self, documents, seq_len: int, name: str, tokenizer):
    dtype = np.uint16 if tokenizer.vocab_size <= 2**16 else np.int32
    self.stream = np.concatenate([np.append(ids, tokenizer.eos_id).astype(dtype)
                                  for ids in tokenizer.encode_documents(documents)])
    self.seq_len, self.bos_id = seq_len, tokenizer.bos_id
    if len(self) == 0:
      raise ShortSplitError(f'The {name} split has {len(self.stream)} tokens, fewer than '
                            f'data.seq_len={seq_len}: lower seq_len or add text.',
                            len(self.stream))

  def __len__(self) -> int:
    return len(self.stream) // self.seq_len

  def __getitem__(self, index: int) -> np.ndarray:
    chunk = self.stream[index * self.seq_len:(index + 1) * self.seq_len]
    return np.concatenate([[self.bos_id], chunk]).astype(np.int32)


class ArrayRecordExamples:
  """Random-access pre-tokenized examples from ArrayRecord files; each read is checked to hold
  seq_len + 1 token ids in [0, vocab_size), or names its file and record."""

  def __init__(self, pattern: str, seq_len: int, vocab_size: int, key: str):
    self.paths = _files(pattern)
    if not self.paths:
      raise DataError(f'{key}={pattern!r} matches no files' + _directory_hint(pattern))
    try:
      self.sources = [grain.sources.ArrayRecordDataSource([path]) for path in self.paths]
    except Exception as error:  # array_record raises plain RuntimeErrors for unreadable files.
      raise DataError(f'{key}={pattern!r}: cannot open as ArrayRecord ({error}).') from None
    self.starts = np.cumsum([0] + [len(source) for source in self.sources])
    self.seq_len, self.vocab_size = seq_len, vocab_size
    if len(self) == 0:
      raise DataError(f'{key}={pattern!r} holds no records.')
    # Fails now, not mid-run, if a file's records were written for another seq_len or vocab.
    for start in self.starts[:-1]:
      if start < len(self):
        self[int(start)]

  def __len__(self) -> int:
    return int(self.starts[-1])

  def __getitem__(self, index: int) -> np.ndarray:
    file = int(np.searchsorted(self.starts, index, side='right')) - 1
    record = index - int(self.starts[file])
    example = np.frombuffer(self.sources[file][record], dtype='<i4').astype(np.int32)
    where = f'{self.paths[file]}: record {record}'
    if example.shape != (self.seq_len + 1,):
      raise DataError(f'{where} has {example.size} tokens; data.seq_len={self.seq_len} needs '
                      f'{self.seq_len + 1}.')
    outside = example[(example < 0) | (example >= self.vocab_size)]
    if outside.size:
      raise DataError(f'{where} holds token id {outside[0]}, outside [0, model.vocab_size='
                      f'{self.vocab_size}): it was tokenized for another vocabulary.')
    return example


def write_array_record(examples, path) -> int:
  """Writes int32 examples (any random-access source) as ArrayRecord records, whole or not at
  all (a temporary file renamed over `path`); returns the count."""
  from array_record.python import array_record_module  # Only needed to write.
  with whole_file(pathlib.Path(path)) as temporary:
    writer = array_record_module.ArrayRecordWriter(str(temporary), 'group_size:1')
    for index in tqdm(range(len(examples)), desc=f'write {pathlib.Path(path).name}',
                      unit='example', file=sys.stdout):
      writer.write(np.asarray(examples[index], dtype='<i4').tobytes())
    writer.close()
  return len(examples)


def load_split(data_config, split: str, vocab_size: int):
  """The random-access source of examples for split 'train' or 'heldout', token ids checked to
  be below vocab_size.

  The held-out documents depend on the corpus alone (a fixed seed), never on train.seed, so runs
  with different seeds are evaluated on the same text."""
  if data_config.source == 'array_record':
    if split == 'heldout' and not data_config.eval_path:
      raise DataError('data.eval_path is empty; data.source=array_record needs a held-out glob.')
    key = 'data.path' if split == 'train' else 'data.eval_path'
    examples = ArrayRecordExamples(data_config[key[5:]], data_config.seq_len, vocab_size, key)
    real = lambda pattern: {os.path.realpath(path) for path in _files(pattern)}
    both = real(data_config.path) & real(data_config.eval_path) if data_config.eval_path else ()
    if both:
      raise DataError(f'data.path={data_config.path!r} and data.eval_path='
                      f'{data_config.eval_path!r} both match {sorted(both)[:3]}'
                      f'{" and more" if len(both) > 3 else ""}: held-out examples would be '
                      'trained on. Give each split files of its own.')
    return examples
  if data_config.source == 'bigram_backcopy':
    from gated_attention import bigram_backcopy  # It builds on this module.
    return bigram_backcopy.load_split(data_config, split, vocab_size)
  tokenizer = load_tokenizer(data_config.tokenizer)
  if tokenizer is None:
    raise DataError(f'data.tokenizer={data_config.tokenizer!r}: data.source='
                    f'{data_config.source!r} reads text; name a tokenizer (\'byte\' or a '
                    'tokenizer.json) or use pre-tokenized data.source=array_record.')
  if data_config.source == 'embedded':
    documents, where = embedded_documents(), 'the embedded corpus'
  else:
    documents, where = text_file_documents(data_config.path), f'data.path={data_config.path!r}'
  train, heldout = split_documents(documents, data_config.heldout_fraction, seed=0, where=where)
  return TokenChunks(train if split == 'train' else heldout, data_config.seq_len, split,
                     tokenizer)


FINGERPRINT_SAMPLES = 64  # Examples hashed of a source whose whole text is not at hand.


def fingerprint(source) -> str:
  """'N examples, sha256 XXXXXXXXXXXX': what a checkpoint records of its training data, so a
  resume on other data (another Python's standard library, edited files) is not silent. Hashes
  the whole token stream of text sources, else FINGERPRINT_SAMPLES evenly spaced examples."""
  digest = hashlib.sha256(f'{len(source)}'.encode())
  if isinstance(source, TokenChunks):
    digest.update(np.ascontiguousarray(source.stream[:len(source) * source.seq_len]))
  else:
    for index in np.linspace(0, len(source) - 1, FINGERPRINT_SAMPLES).astype(int):
      digest.update(np.asarray(source[int(index)], np.int32).tobytes())
  return f'{len(source):,} examples, sha256 {digest.hexdigest()[:12]}'


def train_dataset(source, global_batch_size: int, seed: int, part: int,
                  parts: int) -> grain.IterDataset:
  """Endless, seeded, reshuffled-every-epoch batches: of each global batch, rows
  [part * n, (part + 1) * n), n = global_batch_size // parts (this process's part:
  sharding.batch_part), so the parts in order are the one-process batch, row for row.

  Yields int32 [n, seq_len + 1]. Its iterator's get_state() goes into checkpoints (it counts
  global batches), so a resumed run sees exactly the batches it would have seen.
  """
  dataset = grain.MapDataset.source(source).seed(seed).shuffle().repeat()
  return _part_of_each_batch(dataset, global_batch_size, part, parts).to_iter_dataset()


def _part_of_each_batch(dataset: grain.MapDataset, global_batch_size: int, part: int,
                        parts: int) -> grain.MapDataset:
  """Batches of the rows [part * n, (part + 1) * n) of each global batch of `dataset`."""
  return dataset.batch(global_batch_size // parts, drop_remainder=True)[part::parts]


def translate_position(iterator_state: dict, saved_batch_size: int,
                       batch_size: int) -> tuple[dict, int, int]:
  """(state, examples consumed, examples repeated): the state of a train_dataset iterator with
  global batch `batch_size` that continues as many examples into its order as one with
  `saved_batch_size` had consumed, rounded down to whole batches (the remainder is repeated).

  The state counts global batches, the same on every process."""
  consumed = iterator_state['next_index'] * saved_batch_size
  batches = consumed // batch_size
  return {**iterator_state, 'next_index': batches}, consumed, consumed - batches * batch_size


def heldout_batch_count(source, global_batch_size: int, num_batches: int) -> int:
  """How many of num_batches global batches the held-out split holds."""
  return min(num_batches, len(source) // global_batch_size)


def heldout_batches(source, global_batch_size: int, num_batches: int, part: int, parts: int):
  """The first num_batches global batches of the held-out split, in order (fewer if it is short);
  yields this process's part of each (as train_dataset), int32 [global_batch_size // parts,
  seq_len + 1]."""
  usable = heldout_batch_count(source, global_batch_size, num_batches) * global_batch_size
  if usable == 0:
    raise DataError(f'The held-out split has {len(source)} examples, fewer than one eval batch '
                    f'of {global_batch_size}: lower eval.batch_size or data.seq_len.')
  return iter(_part_of_each_batch(grain.MapDataset.source(source)[:usable], global_batch_size,
                                  part, parts))
