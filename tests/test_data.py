"""Data: tokenizer, document split, chunking, determinism, resumable iteration, errors."""

import re

import numpy as np
import pytest

from gated_attention import config as config_lib
from gated_attention import data
from gated_attention.tokenizer import ByteTokenizer

BYTES = ByteTokenizer()
VOCAB = BYTES.vocab_size


def test_embedded_corpus_is_real_and_split_by_document():
  documents = data.embedded_documents()
  assert len(documents) > 100 and sum(len(t) for _, t in documents) > 5_000_000
  train, heldout = data.split_documents(documents, 0.05, seed=0)
  assert not {n for n, _ in train} & {n for n, _ in heldout}
  assert len(train) + len(heldout) == len(documents)
  assert abs(len(heldout) - 0.05 * len(documents)) <= 1
  again = data.split_documents(documents, 0.05, seed=0)[1]
  assert [n for n, _ in again] == [n for n, _ in heldout]


@pytest.mark.parametrize('fraction, heldout', [(0.05, 1), (0.9, 3)])
def test_a_fraction_that_rounds_outside_the_documents_is_moved_and_said(fraction, heldout,
                                                                       capsys):
  documents = [(f'doc{i}', b'text') for i in range(4)]
  data._log_once.cache_clear()  # Said once per process: this test may not be the first.
  train, held = data.split_documents(documents, fraction, seed=0, where='data.path=x')
  assert (len(train), len(held)) == (4 - heldout, heldout)
  assert (f'data.heldout_fraction={fraction} of the 4 documents of data.path=x rounds to '
          f'{round(fraction * 4)}; {heldout} held out instead') in capsys.readouterr().out
  data.split_documents(documents * 5, 0.05, seed=0)  # 20 documents: 1 held out, as rounded.
  assert capsys.readouterr().out == ''


def test_examples_start_with_bos_and_continue_the_stream():
  documents = [('a', b'abcdefgh'), ('b', b'ijklmnop')]
  chunks = data.TokenChunks(documents, seq_len=5, name='test', tokenizer=BYTES)
  stream = np.concatenate([BYTES.encode(b'abcdefgh'), [BYTES.eos_id],
                           BYTES.encode(b'ijklmnop'), [BYTES.eos_id]])
  assert len(chunks) == len(stream) // 5
  for i in range(len(chunks)):
    example = chunks[i]
    assert example.dtype == np.int32 and example.shape == (6,)
    assert example[0] == BYTES.bos_id
    np.testing.assert_array_equal(example[1:], stream[5 * i:5 * i + 5])


def _batches(iterator, count):
  return [next(iterator).copy() for _ in range(count)]


def test_train_batches_are_deterministic_and_resume_exactly():
  source = data.TokenChunks([('a', bytes(range(256)) * 20)], seq_len=8, name='test',
                            tokenizer=BYTES)
  make = lambda: iter(data.train_dataset(source, 4, seed=3, part=0, parts=1))
  first = make()
  head = _batches(first, 5)
  state = first.get_state()
  tail = _batches(first, 5)
  np.testing.assert_array_equal(np.stack(head), np.stack(_batches(make(), 5)))
  resumed = make()
  resumed.set_state(state)
  np.testing.assert_array_equal(np.stack(tail), np.stack(_batches(resumed, 5)))
  other_seed = iter(data.train_dataset(source, 4, seed=4, part=0, parts=1))
  assert not np.array_equal(np.stack(head), np.stack(_batches(other_seed, 5)))


def test_process_parts_in_order_are_the_one_process_batches_row_for_row():
  """Part p of P holds rows [p * n, (p + 1) * n) of each global batch, so every row sits where
  one process would put it (microbatches take rows i, i + k, ...: the same examples whatever
  the process count), in training and in held-out batches alike."""
  source = data.TokenChunks([('a', bytes(range(256)) * 8)], seq_len=8, name='test',
                            tokenizer=BYTES)
  whole = iter(data.train_dataset(source, 8, 0, 0, 1))
  parts = [iter(data.train_dataset(source, 8, 0, p, 4)) for p in range(4)]
  for _ in range(5):  # Past the first epoch of 28 examples.
    batches = [next(part) for part in parts]
    assert batches[0].shape == (2, 9)
    np.testing.assert_array_equal(np.concatenate(batches), next(whole))
  whole = list(data.heldout_batches(source, 8, 2, 0, 1))
  parts = [list(data.heldout_batches(source, 8, 2, p, 2)) for p in range(2)]
  for index, batch in enumerate(whole):
    np.testing.assert_array_equal(np.concatenate([part[index] for part in parts]), batch)


def test_text_files_source(tmp_path):
  for i in range(4):
    (tmp_path / f'doc{i}.txt').write_text(f'document number {i} ' * 50)
  config = config_lib.base_config('tiny').data
  config.update(source='text_files', path=str(tmp_path / '*.txt'), seq_len=16,
                heldout_fraction=0.25)
  train = data.load_split(config, 'train', VOCAB)
  heldout = data.load_split(config, 'heldout', VOCAB)
  assert len(heldout) > 0 and len(train) > 2 * len(heldout)

  def documents(split) -> list[bytes]:
    """The split's examples as the documents they carry: BOS first in each, documents ended by
    EOS, the last one cut short with the stream's tail."""
    assert all(split[i][0] == BYTES.bos_id for i in range(len(split)))
    stream = np.concatenate([split[i][1:] for i in range(len(split))])
    starts = [0, *(np.flatnonzero(stream == BYTES.eos_id) + 1)]
    ends = [*(np.flatnonzero(stream == BYTES.eos_id)), len(stream)]
    return [bytes(stream[a:b].astype(np.uint8)) for a, b in zip(starts, ends)]

  files = [(tmp_path / f'doc{i}.txt').read_bytes() for i in range(4)]
  source = lambda text: [i for i, file in enumerate(files) if file.startswith(text)]
  held, trained = documents(heldout), documents(train)
  # Held out: one whole document of four (cut at the split's last full example); trained: the
  # other three, whole but the last.
  assert len(held) == 1 and len(source(held[0])) == 1
  assert all(text in files for text in trained[:-1]) and len(trained) == 3
  assert sorted(source(held[0]) + [i for text in trained for i in source(text)]) == [0, 1, 2, 3]


def test_array_record_source_gives_the_text_files_examples(tmp_path):
  for i in range(6):
    (tmp_path / f'doc{i}.txt').write_text(f'document {i}: ' + 'gated attention ' * (20 + i))
  text = config_lib.base_config('tiny').data
  text.update(source='text_files', path=str(tmp_path / '*.txt'), seq_len=16, heldout_fraction=0.3)
  records = config_lib.base_config('tiny').data
  records.update(source='array_record', path=str(tmp_path / 'train.ar'),
                 eval_path=str(tmp_path / 'heldout.ar'), seq_len=16)
  for split, path in (('train', 'train.ar'), ('heldout', 'heldout.ar')):
    expected = data.load_split(text, split, VOCAB)
    assert data.write_array_record(expected, tmp_path / path) == len(expected)
    loaded = data.load_split(records, split, VOCAB)
    np.testing.assert_array_equal(np.stack([loaded[i] for i in range(len(loaded))]),
                                  np.stack([expected[i] for i in range(len(expected))]))
  records.seq_len = 8
  with pytest.raises(data.DataError, match='record 0 has 17 tokens; data.seq_len=8 needs 9'):
    data.load_split(records, 'heldout', VOCAB)


@pytest.mark.parametrize('source, path, message', [
    ('text_files', '/nonexistent/*.txt', "data.path='/nonexistent/\\*.txt' matches no files"),
    ('array_record', '/nonexistent/*.ar', "data.path='/nonexistent/\\*.ar' matches no files"),
])
def test_missing_paths_are_named(source, path, message):
  config = config_lib.base_config('tiny').data
  config.update(source=source, path=path)
  with pytest.raises(data.DataError, match=message):
    data.load_split(config, 'train', VOCAB)


@pytest.mark.parametrize('source', ['text_files', 'array_record'])
def test_a_directory_or_a_single_document_is_named_with_what_to_give(source, tmp_path):
  (tmp_path / 'only.txt').write_text('one document ' * 20)
  config = config_lib.base_config('tiny').data
  config.update(source=source, path=str(tmp_path))
  with pytest.raises(data.DataError, match=re.escape(
      f"data.path={str(tmp_path)!r} matches no files (it is a directory: give a glob of its "
      f"files, e.g. {str(tmp_path / '**' / '*')!r}).")):
    data.load_split(config, 'train', VOCAB)
  if source == 'text_files':
    config.path = str(tmp_path / '*.txt')
    with pytest.raises(data.DataError, match=re.escape(
        f"data.path={config.path!r} gives 1 document(s): a held-out split needs at least 2")):
      data.load_split(config, 'train', VOCAB)


def test_seq_len_the_split_cannot_fill(tmp_path):
  for i in range(2):
    (tmp_path / f'{i}.txt').write_text('short')
  config = config_lib.base_config('tiny').data
  config.update(source='text_files', path=str(tmp_path / '*.txt'), seq_len=64)
  with pytest.raises(data.DataError, match='fewer than data.seq_len=64'):
    data.load_split(config, 'heldout', VOCAB)


def test_heldout_batches_are_in_order_and_bounded():
  source = data.TokenChunks([('a', bytes(range(200)))], seq_len=4, name='test',
                            tokenizer=BYTES)
  batches = list(data.heldout_batches(source, 8, num_batches=3, part=0, parts=1))
  assert len(batches) == 3
  np.testing.assert_array_equal(np.concatenate(batches), [source[i] for i in range(24)])
  # The second half of each batch, for the second of two processes.
  halves = list(data.heldout_batches(source, 8, num_batches=3, part=1, parts=2))
  np.testing.assert_array_equal(np.concatenate(halves),
                                [source[8 * b + i] for b in range(3) for i in range(4, 8)])
  assert data.heldout_batch_count(source, 8, num_batches=100) == len(source) // 8


def test_a_translated_position_continues_the_same_stream_of_examples():
  """After 6 batches of 4, a pipeline with batches of 6 (or 5) starts at example 24 (or 20) of the
  seeded order, which does not depend on the batch size."""
  source = data.TokenChunks([('a', bytes(range(256)) * 20)], seq_len=8, name='test',
                            tokenizer=BYTES)
  stream = np.concatenate(_batches(iter(data.train_dataset(source, 2, 3, 0, 1)), 20))
  old = iter(data.train_dataset(source, 4, 3, 0, 1))
  _batches(old, 6)
  for batch_size, start, repeated in ((6, 24, 0), (5, 20, 4)):
    state, consumed, seen_again = data.translate_position(old.get_state(), 4, batch_size)
    assert (consumed, seen_again) == (24, repeated)
    new = iter(data.train_dataset(source, batch_size, 3, 0, 1))
    new.set_state(state)
    np.testing.assert_array_equal(next(new), stream[start:start + batch_size])


def test_array_record_files_of_another_seq_len_are_named_at_start_up(tmp_path):
  """Each file's first record is read when the source opens, not only the first file's."""
  data.write_array_record(np.zeros((3, 9), np.int32), tmp_path / 'a.ar')
  data.write_array_record(np.zeros((3, 17), np.int32), tmp_path / 'b.ar')
  records = config_lib.base_config('tiny').data
  records.update(source='array_record', path=str(tmp_path / '*.ar'), seq_len=8)
  with pytest.raises(data.DataError, match='b.ar: record 0 has 17 tokens; data.seq_len=8 needs 9'):
    data.load_split(records, 'train', 384)


def test_array_record_splits_that_share_a_file_are_refused(tmp_path):
  """data.path='DIR/*.ar' also matches the held-out file (by its real path, through a link)."""
  for name in ('train.ar', 'heldout.ar'):
    data.write_array_record(np.zeros((3, 9), np.int32), tmp_path / name)
  (tmp_path / 'link').symlink_to(tmp_path)
  records = config_lib.base_config('tiny').data
  records.update(source='array_record', path=str(tmp_path / '*.ar'), seq_len=8,
                 eval_path=str(tmp_path / 'link' / 'heldout.ar'))
  for split in ('train', 'heldout'):
    with pytest.raises(data.DataError, match=r"data.path='.*\*.ar' and data.eval_path='.*link/"
                                             r"heldout.ar' both match \['.*/heldout.ar'\]: "
                                             'held-out examples would be trained on'):
      data.load_split(records, split, 384)
  records.path = str(tmp_path / 'train.ar')
  assert len(data.load_split(records, 'train', 384)) == 3


def test_array_record_ids_outside_the_vocabulary_name_file_and_record(tmp_path):
  examples = np.tile(np.arange(9, dtype=np.int32), (10, 1))
  examples[3, 4], examples[8, 0] = 384, -1
  data.write_array_record(examples[:6], tmp_path / 'a.ar')
  data.write_array_record(examples[6:], tmp_path / 'b.ar')
  records = config_lib.base_config('tiny').data
  records.update(source='array_record', path=str(tmp_path / '*.ar'), seq_len=8)
  loaded = data.load_split(records, 'train', 384)
  np.testing.assert_array_equal(loaded[7], examples[7])
  for index, message in ((3, 'a.ar: record 3 holds token id 384'),
                         (8, 'b.ar: record 2 holds token id -1')):
    with pytest.raises(data.DataError, match=f'{message}, outside \\[0, model.vocab_size=384\\)'):
      loaded[index]
  with pytest.raises(data.DataError, match='a.ar: record 0 holds token id 8, outside'):
    data.load_split(records, 'train', 8)  # The first record is read at once.


def test_the_fingerprint_follows_the_training_text_and_nothing_else(tmp_path):
  """A same-length edit in one file changes it (the whole stream is hashed); the same files
  read again do not; a source without a stream is hashed by its examples."""
  for name, text in (('a.txt', 'first document ' * 40), ('b.txt', 'second one ' * 40),
                     ('c.txt', 'third text ' * 40)):
    (tmp_path / name).write_text(text)
  config = config_lib.base_config('tiny').data
  config.update(source='text_files', path=str(tmp_path / '*.txt'), seq_len=16)
  before = data.fingerprint(data.load_split(config, 'train', VOCAB))
  assert data.fingerprint(data.load_split(config, 'train', VOCAB)) == before
  assert re.fullmatch(r'\d+ examples, sha256 [0-9a-f]{12}', before)
  train = data.load_split(config, 'train', VOCAB)
  edited = next(name for name in ('a.txt', 'b.txt', 'c.txt')
                if (tmp_path / name).read_bytes() in bytes(train.stream.astype(np.uint8)))
  text = (tmp_path / edited).read_text()
  (tmp_path / edited).write_text(text[:100] + text[100:].replace('e', 'E', 1))
  assert data.fingerprint(data.load_split(config, 'train', VOCAB)) != before
  bigram = config_lib.base_config('tiny').data
  bigram.update(source='bigram_backcopy', seq_len=16)
  seeded = data.fingerprint(data.load_split(bigram, 'train', VOCAB))
  bigram.bigram_backcopy.seed += 1
  assert data.fingerprint(data.load_split(bigram, 'train', VOCAB)) != seeded
