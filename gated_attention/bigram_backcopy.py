"""The Bigram-Backcopy (BB) task (Guo et al. 2024, "Active-Dormant Attention Heads",
arXiv 2410.13835): a synthetic corpus on which a one- or two-layer model forms an attention sink
within a few hundred steps.

A sequence of seq_len + 1 tokens is x_0 = BOS, x_1 drawn from the corpus's byte unigram
distribution without the triggers, then for t >= 1

    x_{t+1} = x_{t-1}              if x_t is a trigger     (the back-copy),
    x_{t+1} ~ P(. | x_t)           otherwise                (the bigram chain),

where the triggers are the `num_triggers` most frequent bytes of the corpus and P is its byte
bigram transition matrix (pairs within a document). Predicting the copy needs a head that is
active on triggers and dormant elsewhere, and softmax attention can only be dormant by putting
its attention on a token whose value it ignores: the first. That is the paper's argument for the
gate, which lets a head switch itself off.

Because x_1 is not a trigger, by induction the token after a trigger (a copy of the token before
it) never is one either: no two triggers are adjacent.

Example i of a split is generated from (seed, split, i) alone, so the source is random access,
deterministic and resumable through the data iterator's position like the other sources; the
train and held-out splits are different random streams.
"""

import bisect
import dataclasses
import functools

import numpy as np

from gated_attention import data as data_lib
from gated_attention.tokenizer import ByteTokenizer

NUM_BYTES = 256
EXAMPLES_PER_SPLIT = 2**48  # Endless in practice: every step reads sequences never seen before.
SPLIT_STREAMS = {'train': 0, 'heldout': 1}


@dataclasses.dataclass(frozen=True)
class BigramChain:
  """The statistics that drive BB sequences, all over byte ids 0..255.

  unigram      float64 [256]: byte frequencies of the corpus (sums to 1);
  transitions  float64 [256, 256]: P(next byte | byte), rows sum to 1 (a byte never followed by
               another in the corpus continues with the unigram);
  triggers     int32 [num_triggers]: the most frequent bytes, most frequent first (ties: lower id).
  """
  unigram: np.ndarray
  transitions: np.ndarray
  triggers: np.ndarray

  @property
  def first_token(self) -> np.ndarray:
    """float64 [256]: the distribution of x_1, the unigram without the triggers."""
    probs = self.unigram.copy()
    probs[self.triggers] = 0.0
    return probs / probs.sum()


def byte_counts(documents) -> tuple[np.ndarray, np.ndarray]:
  """(unigram int64 [256], bigram int64 [256, 256]) counts over the documents' bytes; bigram
  pairs never cross a document boundary."""
  unigram = np.zeros(NUM_BYTES, np.int64)
  bigram = np.zeros(NUM_BYTES * NUM_BYTES, np.int64)
  for _, text in documents:
    ids = np.frombuffer(text, dtype=np.uint8).astype(np.int64)
    unigram += np.bincount(ids, minlength=NUM_BYTES)
    bigram += np.bincount(ids[:-1] * NUM_BYTES + ids[1:], minlength=NUM_BYTES * NUM_BYTES)
  return unigram, bigram.reshape(NUM_BYTES, NUM_BYTES)


def chain_from_documents(documents, num_triggers: int) -> BigramChain:
  """The BB statistics of a corpus given as (name, bytes) documents."""
  unigram_counts, bigram_counts = byte_counts(documents)
  distinct = int(np.count_nonzero(unigram_counts))
  if num_triggers >= distinct:
    raise data_lib.DataError(
        f'data.bigram_backcopy.num_triggers={num_triggers}: the bigram corpus has {distinct} '
        'distinct bytes, and x_1 needs at least one that is not a trigger.')
  unigram = unigram_counts / unigram_counts.sum()
  followers = bigram_counts.sum(axis=1, keepdims=True)
  transitions = np.where(followers > 0, bigram_counts / np.maximum(followers, 1), unigram)
  triggers = np.argsort(-unigram_counts, kind='stable')[:num_triggers].astype(np.int32)
  return BigramChain(unigram, transitions, triggers)


@functools.lru_cache(maxsize=4)
def bigram_chain(bigram_path: str, num_triggers: int) -> BigramChain:
  """The chain of the text files matching `bigram_path` (a glob), or of the embedded corpus when
  it is empty; computed once per process."""
  documents = (data_lib.text_file_documents(bigram_path, 'data.bigram_backcopy.bigram_path')
               if bigram_path else data_lib.embedded_documents())
  return chain_from_documents(documents, num_triggers)


def chain_of(data_config) -> BigramChain:
  """The chain `data_config.bigram_backcopy` describes."""
  task = data_config.bigram_backcopy
  return bigram_chain(task.bigram_path, task.num_triggers)


def trigger_queries(tokens, triggers) -> np.ndarray:
  """bool, the shape of tokens: True where the token is a trigger, so that the query at that
  position must back-copy (its head active); False where it continues the bigram chain."""
  return np.isin(np.asarray(tokens), np.asarray(triggers))


def _cumulative(probs: np.ndarray) -> list[float]:
  """Cumulative probabilities ending at exactly 1.0, for bisect sampling: bisect_right(c, u)
  with u uniform in [0, 1) returns i with probability probs[i], never an index of probability 0."""
  cumulative = np.cumsum(probs)
  return (cumulative / cumulative[-1]).tolist()


class BigramBackcopy:
  """Random-access BB examples: int32 [seq_len + 1], BOS then seq_len byte ids."""

  def __init__(self, chain: BigramChain, seq_len: int, seed: int, split: str):
    self.seq_len, self.seed, self.stream = seq_len, seed, SPLIT_STREAMS[split]
    self.first_token = _cumulative(chain.first_token)
    self.transitions = [_cumulative(row) for row in chain.transitions]
    self.is_trigger = trigger_queries(np.arange(NUM_BYTES), chain.triggers).tolist()

  def __len__(self) -> int:
    return EXAMPLES_PER_SPLIT

  def __getitem__(self, index: int) -> np.ndarray:
    uniforms = np.random.default_rng([self.seed, self.stream, int(index)]).random(self.seq_len)
    uniforms = uniforms.tolist()
    tokens = [ByteTokenizer.bos_id, bisect.bisect_right(self.first_token, uniforms[0])]
    for u in uniforms[1:]:
      current = tokens[-1]
      tokens.append(tokens[-2] if self.is_trigger[current]
                    else bisect.bisect_right(self.transitions[current], u))
    return np.asarray(tokens, dtype=np.int32)


def load_split(data_config, split: str, vocab_size: int) -> BigramBackcopy:
  """The 'train' or 'heldout' BB source of `data_config` (data.source=bigram_backcopy) for a
  model of vocab_size ids, which must hold the byte tokenizer's BOS."""
  if vocab_size <= ByteTokenizer.bos_id:
    raise data_lib.DataError(f'model.vocab_size={vocab_size}: data.source=bigram_backcopy uses '
                             f'byte ids and BOS {ByteTokenizer.bos_id}; it needs more ids.')
  return BigramBackcopy(chain_of(data_config), data_config.seq_len,
                        data_config.bigram_backcopy.seed, split)
