"""The Bigram-Backcopy source: its rule, its statistics against counts taken independently of the
code (collections.Counter over the corpus), determinism, splits and resumable iteration."""

import collections

import numpy as np
import pytest

from gated_attention import bigram_backcopy as bb
from gated_attention import config as config_lib
from gated_attention import data
from gated_attention.tokenizer import ByteTokenizer

VOCAB_SIZE = 384  # base_config's.

ALPHABET = b'abcdefgh'


def _corpus(tmp_path) -> list[bytes]:
  """Two files of a random 8-letter Markov chain with distinct letter frequencies."""
  rng = np.random.default_rng(0)
  transitions = rng.dirichlet(np.full(len(ALPHABET), 0.7), size=len(ALPHABET))
  texts = []
  for name, length in (('one.txt', 6000), ('two.txt', 4000)):
    letters = [0]
    for _ in range(length - 1):
      letters.append(rng.choice(len(ALPHABET), p=transitions[letters[-1]]))
    texts.append(bytes(ALPHABET[i] for i in letters))
    (tmp_path / name).write_bytes(texts[-1])
  return texts


def _data_config(tmp_path, num_triggers=2, seq_len=64, seed=0):
  config = config_lib.base_config('tiny').data
  config.update(source='bigram_backcopy', seq_len=seq_len)
  config.bigram_backcopy.update(num_triggers=num_triggers, bigram_path=str(tmp_path / '*.txt'),
                                seed=seed)
  return config


def _examples(source, count, start=0) -> np.ndarray:
  return np.stack([source[i] for i in range(start, start + count)])


def _check_rule(examples: np.ndarray, triggers) -> None:
  triggers = set(int(t) for t in triggers)
  assert examples.dtype == np.int32
  assert (examples[:, 0] == ByteTokenizer.bos_id).all()
  assert (examples[:, 1:] < 256).all() and (examples[:, 1:] >= 0).all()
  assert not set(examples[:, 1].tolist()) & triggers
  for row in examples.tolist():
    for t in range(1, len(row) - 1):
      if row[t] in triggers:
        assert row[t + 1] == row[t - 1], (t, row)
        assert row[t - 1] not in triggers  # No two triggers are ever adjacent.


def test_triggers_are_the_most_frequent_bytes(tmp_path):
  texts = _corpus(tmp_path)
  counts = collections.Counter(b''.join(texts))
  ranked = [byte for byte, _ in counts.most_common()]
  assert len(set(counts.values())) == len(counts)  # Distinct counts: the ranking is unambiguous.
  for k in (0, 1, 3):
    chain = bb.chain_of(_data_config(tmp_path, num_triggers=k))
    assert chain.triggers.tolist() == ranked[:k]


def test_statistics_are_the_corpus_counts(tmp_path):
  texts = _corpus(tmp_path)
  chain = bb.chain_of(_data_config(tmp_path))
  unigram = collections.Counter(b''.join(texts))
  pairs = collections.Counter(p for text in texts for p in zip(text, text[1:]))
  total = sum(unigram.values())
  for a in range(256):
    assert chain.unigram[a] == pytest.approx(unigram[a] / total)
    followers = sum(n for (x, _), n in pairs.items() if x == a)
    for b in ALPHABET:
      expected = pairs[a, b] / followers if followers else unigram[b] / total
      assert chain.transitions[a, b] == pytest.approx(expected)
  # 'h' ends no file here, so every letter has followers; a byte with none continues with the
  # unigram: check on a corpus whose only 'z' is its last byte.
  (tmp_path / 'two.txt').write_bytes(texts[1] + b'z')
  with_z = bb.chain_from_documents(data.text_file_documents(str(tmp_path / '*.txt')), 2)
  np.testing.assert_allclose(with_z.transitions[ord('z')], with_z.unigram)


def _chi_square_bound(observed: np.ndarray, probs: np.ndarray) -> tuple[float, float]:
  """(Pearson's statistic summed over rows, a bound it exceeds with negligible probability)
  for rows of observed counts against rows of probabilities; observed counts where the
  probability is 0 must be 0."""
  assert not observed[probs == 0].any()
  expected = observed.sum(axis=1, keepdims=True) * probs
  mask = expected > 0
  statistic = float((((observed - expected) ** 2)[mask] / expected[mask]).sum())
  dof = int(sum(max(np.count_nonzero(row) - 1, 0)
                for row, n in zip(mask, observed.sum(axis=1)) if n))
  return statistic, dof + 8 * np.sqrt(2 * dof)  # Mean dof, standard deviation about sqrt(2 dof).


def test_sequences_follow_the_rule_and_the_bigram_chain(tmp_path):
  texts = _corpus(tmp_path)
  config = _data_config(tmp_path, num_triggers=2, seq_len=64)
  chain = bb.chain_of(config)
  examples = _examples(data.load_split(config, 'train', VOCAB_SIZE), 600)
  _check_rule(examples, chain.triggers)

  # x_1 follows the unigram without the triggers.
  first = np.bincount(examples[:, 1], minlength=256)[None]
  counts = collections.Counter(b''.join(texts))
  expected_first = np.array([0 if b in chain.triggers else counts[b] for b in range(256)], float)
  statistic, bound = _chi_square_bound(first, (expected_first / expected_first.sum())[None])
  assert statistic < bound

  # Every transition out of a non-trigger (t >= 1) is a draw from that byte's bigram row.
  current, following = examples[:, 1:-1].ravel(), examples[:, 2:].ravel()
  chained = ~bb.trigger_queries(current, chain.triggers)
  observed = np.zeros((256, 256))
  np.add.at(observed, (current[chained], following[chained]), 1)
  statistic, bound = _chi_square_bound(observed, chain.transitions)
  assert statistic < bound
  # The test has the power to see a wrong chain: the unigram in place of the bigram rows fails.
  assert _chi_square_bound(observed, np.broadcast_to(chain.unigram, (256, 256)))[0] > bound


def test_embedded_corpus_sequences_follow_the_rule():
  config = config_lib.base_config('tiny').data
  config.update(source='bigram_backcopy', seq_len=256)
  source = data.load_split(config, 'train', VOCAB_SIZE)
  examples = _examples(source, 50)
  assert examples.shape == (50, 257)
  _check_rule(examples, bb.chain_of(config).triggers)
  # About a third of the queries are triggers ('the attention sink' needs both kinds).
  share = bb.trigger_queries(examples[:, 1:], bb.chain_of(config).triggers).mean()
  assert 0.2 < share < 0.5


def test_examples_are_a_function_of_seed_split_and_index(tmp_path):
  _corpus(tmp_path)
  config = _data_config(tmp_path)
  train = data.load_split(config, 'train', VOCAB_SIZE)
  heldout = data.load_split(config, 'heldout', VOCAB_SIZE)
  again = data.load_split(config, 'train', VOCAB_SIZE)
  np.testing.assert_array_equal(train[12345], again[12345])
  assert not np.array_equal(train[0], train[1])
  other_seed = data.load_split(_data_config(tmp_path, seed=1), 'train', VOCAB_SIZE)
  assert not np.array_equal(train[0], other_seed[0])
  as_set = lambda rows: set(map(tuple, rows.tolist()))
  assert not as_set(_examples(train, 300)) & as_set(_examples(heldout, 300))


def test_training_batches_resume_exactly(tmp_path):
  _corpus(tmp_path)
  source = data.load_split(_data_config(tmp_path, seq_len=16), 'train', VOCAB_SIZE)
  make = lambda: iter(data.train_dataset(source, 4, seed=3, part=0, parts=1))
  first = make()
  [next(first) for _ in range(3)]
  state = first.get_state()
  tail = np.stack([next(first) for _ in range(3)])
  resumed = make()
  resumed.set_state(state)
  np.testing.assert_array_equal(tail, np.stack([next(resumed) for _ in range(3)]))


def test_bad_trigger_counts_are_named(tmp_path):
  _corpus(tmp_path)
  config = config_lib.base_config('tiny')
  config.data = _data_config(tmp_path, num_triggers=8)
  config_lib.validate(config)  # 8 is a valid count of bytes; this corpus has only 8 distinct.
  with pytest.raises(data.DataError, match='data.bigram_backcopy.num_triggers=8'):
    data.load_split(config.data, 'train', VOCAB_SIZE)
  config.data.bigram_backcopy.num_triggers = 256
  with pytest.raises(config_lib.ConfigError, match='data.bigram_backcopy.num_triggers=256'):
    config_lib.validate(config)
