"""Long-context evaluation: held-out loss by position, and synthetic retrieval by generation.

For each context length L (`lengths`):
  loss by position   the held-out split re-chunked as training would read it at the longest
                     length, each window cut to its first L text tokens after BOS (L targets;
                     every length reads the same text from the same starts); the mean
                     next-token loss of the targets at positions [edges[i], edges[i + 1]), edges
                     0, 16, 32, 64, ..., L (doubling): is the model still predicting well at
                     position 3k of a 4k window? (A causal model's loss at position p reads only
                     the tokens before p, so each length's buckets repeat the longest window's:
                     the lengths differ in how far the curve reaches.)
  retrieval          RULER-style tasks (Hsieh et al. 2024) built from the held-out text as the
                     haystack, scored by greedy generation with the KV cache (`Generator`): an
                     example is correct when the generated text starts with the answer.
    passkey            one needle line `PASSKEY = 48213` at a depth of 5%..95% of the haystack,
                       evenly over the examples; the prompt ends with `PASSKEY = `.
    multikey           four needles `KEY_XXXX = digits` at random depths, distinct names and
                       values; the prompt asks for one of them.
    variable_tracking  a chain `VAR_A = 48213`, `VAR_B = VAR_A`, `VAR_C = VAR_B` at increasing
                       depths among other text; the prompt ends with `assert VAR_C == `: the
                       answer is the chain's value, found by following every hop.
  Besides greedy accuracy, each task reports answer_loss: the mean loss on the answer's tokens
  after the prompt (teacher forced; about ln 10 = 2.3 per digit for a model that cannot find
  the needle and knows only that digits come, near 0 for one that retrieves it).
  Every answer appears exactly once in its prompt (values absent from the haystack are drawn);
  prompts are L - ANSWER_TOKENS tokens, so prompt and answer fit in L.

Writes WORKDIR/long_eval/step_N.json and PNGs (loss against position per length, accuracy
against length per task). The model runs with the config saved in the checkpoint; its
attention_impl 'auto' picks a path whose memory is linear in length on CPUs (cpu_flash, and
chunked where a KV cache is read).
"""

import dataclasses
import json
import pathlib
import string
import sys
import time

import jax
import ml_collections
import numpy as np
import optax
from tqdm import tqdm

from gated_attention import config as config_lib
from gated_attention import data as data_lib
from gated_attention import sharding as sharding_lib
from gated_attention import tokenizer as tokenizer_lib
from gated_attention.checkpoint import write_whole
from gated_attention.distributed import log
from gated_attention.evaluate import restore_run
from gated_attention.generate import Generator
from gated_attention.model import apply
from gated_attention.tokenizer import load_tokenizer

FIRST_EDGE = 16  # The first position bucket is [0, 16); each later one doubles.
ANSWER_TOKENS = 8  # Tokens generated per retrieval example.
MIN_LENGTH = 128
MULTIKEY_NEEDLES = 4
VARIABLE_HOPS = 3


def bucket_edges(length: int) -> list[int]:
  """[0, 16, 32, 64, ..., length]: position buckets of a window of `length` targets."""
  edges, edge = [0], FIRST_EDGE
  while edge < length:
    edges.append(edge)
    edge *= 2
  return edges + [length]


def bucket_means(losses: np.ndarray, edges: list[int]) -> list[float]:
  """Mean of per-token losses [examples, length] over each position bucket's columns."""
  return [float(losses[:, start:end].mean()) for start, end in zip(edges[:-1], edges[1:])]


def make_token_losses(graphdef, mesh):
  """token_losses(params, tokens [b, L + 1]) -> float32 [b, L]: each target's next-token loss,
  replicated on `mesh` so that every process reads it whole."""
  def token_losses(params, tokens):
    logits = apply(graphdef, params, tokens[:, :-1]).logits
    return optax.softmax_cross_entropy_with_integer_labels(logits, tokens[:, 1:])
  return jax.jit(token_losses, out_shardings=sharding_lib.replicated(mesh))


TEXT_SOURCES = ('embedded', 'text_files')


def check_text_run(config) -> None:
  """Refuses a run whose data is not text with its tokenizer: long_eval cuts held-out text at
  each length and takes its haystacks from it."""
  data_config = config.data
  if data_config.source not in TEXT_SOURCES:
    held = {'array_record': 'pre-tokenized examples of one fixed length',
            'bigram_backcopy': 'synthetic token sequences, not text'}[data_config.source]
    raise data_lib.DataError(
        f'long_eval cuts held-out text at each length and hides needles in it; the run\'s '
        f'data.source={data_config.source} holds {held}. It evaluates runs trained on '
        f'data.source {" or ".join(TEXT_SOURCES)}.')
  if data_config.tokenizer == tokenizer_lib.NONE:
    raise config_lib.ConfigError("data.tokenizer='none': long_eval builds prompts from text "
                                 'and needs the tokenizer the model was trained with.')


def heldout_examples(data_config, vocab_size: int, length: int, count: int) -> np.ndarray:
  """The first `count` held-out examples re-chunked at `length` tokens: int32 [count, length + 1]
  (fewer rows if the split is short) of a text source (`check_text_run`)."""
  data_config = ml_collections.ConfigDict(data_config.to_dict())
  data_config.seq_len = length
  try:
    source = data_lib.load_split(data_config, 'heldout', vocab_size)
  except data_lib.ShortSplitError as error:
    raise data_lib.DataError(
        f'the held-out split has {error.tokens} tokens, fewer than the longest length asked '
        f'({length}): ask for lengths up to {error.tokens}, or hold out more text '
        '(data.heldout_fraction, more documents).') from None
  return np.stack([source[i] for i in range(min(count, len(source)))])


ROWS_PER_CALL = 8  # Examples run together (rounded up to the mesh's batch ways).


def loss_by_position(token_losses, params, tokens: np.ndarray, batch_ways: int) -> np.ndarray:
  """Per-token losses [examples, length] of held-out examples [examples, length + 1], in
  batches of ROWS_PER_CALL rounded up to a multiple of the mesh's batch ways (the last one
  padded), so memory does not grow with the number of examples."""
  rows = -(-min(len(tokens), ROWS_PER_CALL) // batch_ways) * batch_ways
  losses = []
  for start in range(0, len(tokens), rows):
    part = tokens[start:start + rows]
    padded = np.concatenate([part, np.repeat(part[:1], rows - len(part), axis=0)])
    losses.append(np.asarray(token_losses(params, padded))[:len(part)])
  return np.concatenate(losses)


# ---- retrieval tasks --------------------------------------------------------------------------


@dataclasses.dataclass
class RetrievalExample:
  """A prompt (token ids, BOS first), the answer text, and where the needles went (fractions
  of the haystack, in order)."""
  task: str
  prompt: list[int]
  answer: str
  depths: list[float]


def _value(rng, haystack_text: str) -> str:
  """A 5-digit value that the haystack does not contain."""
  while True:
    value = str(rng.integers(10_000, 100_000))
    if value not in haystack_text:
      return value


def _name(rng, prefix: str, taken: set, haystack_text: str) -> str:
  while True:
    name = prefix + ''.join(rng.choice(list(string.ascii_uppercase), 4))
    if name not in taken and name not in haystack_text:
      taken.add(name)
      return name


def passkey(rng, haystack_text: str, depth: float):
  """(needles [(depth, text)], query, answer): one needle at `depth`."""
  value = _value(rng, haystack_text)
  return [(depth, f'PASSKEY = {value}')], 'PASSKEY = ', value


def multikey(rng, haystack_text: str, depth: float):
  """MULTIKEY_NEEDLES needles with distinct names and values; the one asked for at `depth`,
  the others at random depths."""
  taken, values = set(), set()
  needles = []
  for index in range(MULTIKEY_NEEDLES):
    name = _name(rng, 'KEY_', taken, haystack_text)
    value = _value(rng, haystack_text)
    while value in values:
      value = _value(rng, haystack_text)
    values.add(value)
    needles.append((depth if index == 0 else float(rng.uniform(0.05, 0.95)),
                    f'{name} = {value}'))
  name, value = needles[0][1].split(' = ')
  return sorted(needles), f'{name} = ', value


def variable_tracking(rng, haystack_text: str, depth: float):
  """A chain of VARIABLE_HOPS assignments from a value, the first at `depth` * 0.5, the rest
  spread after it; the query names the last variable."""
  taken = set()
  names = [_name(rng, 'VAR_', taken, haystack_text) for _ in range(VARIABLE_HOPS)]
  value = _value(rng, haystack_text)
  depths = np.linspace(depth * 0.5, 0.5 + depth * 0.45, VARIABLE_HOPS)
  lines = [f'{names[0]} = {value}'] + [f'{names[i]} = {names[i - 1]}'
                                       for i in range(1, VARIABLE_HOPS)]
  return list(zip(depths.tolist(), lines)), f'assert {names[-1]} == ', value


TASKS = {'passkey': passkey, 'multikey': multikey, 'variable_tracking': variable_tracking}


def build_prompt(tokenizer, haystack: np.ndarray, needles, query: str, length: int):
  """[BOS, haystack with each needle line inserted at its depth, query] of exactly `length`
  tokens: the haystack is cut to fit. Returns (prompt ids, depths as placed)."""
  needle_ids = [tokenizer.encode(f'\n{text}\n').tolist() for _, text in needles]
  query_ids = tokenizer.encode(f'\n{query}').tolist()
  room = length - 1 - len(query_ids) - sum(map(len, needle_ids))
  if room < len(needles) + 1:
    raise config_lib.ConfigError(f'--lengths: {length} tokens cannot hold the needles and '
                                 'query of a retrieval task in this tokenizer; use longer ones.')
  hay = haystack[:room].tolist()
  prompt, start, depths = [tokenizer.bos_id], 0, []
  for (depth, _), ids in zip(needles, needle_ids):
    cut = int(round(depth * room))
    prompt += hay[start:cut]
    depths.append((len(prompt) - 1) / (length - 1))
    prompt += ids
    start = cut
  return prompt + hay[start:] + query_ids, depths


def make_examples(task: str, tokenizer, haystack: np.ndarray, length: int, count: int,
                  seed: int = 0) -> list[RetrievalExample]:
  """`count` examples of `task` with prompts of `length` tokens; example i's haystack starts
  at a different place in the held-out stream and its (asked-for) needle sits at depth
  0.05 + 0.9 i / (count - 1)."""
  rng = np.random.default_rng([seed, length, list(TASKS).index(task)])
  stride = max((len(haystack) - length) // max(count, 1), 1)
  examples = []
  for index in range(count):
    hay = haystack[index * stride % max(len(haystack) - length, 1):][:length]
    depth = 0.05 + 0.9 * index / max(count - 1, 1)
    needles, query, answer = TASKS[task](rng, tokenizer.decode(hay), depth)
    prompt, depths = build_prompt(tokenizer, hay, needles, query, length)
    examples.append(RetrievalExample(task, prompt, answer, depths))
  return examples


def answer_losses(token_losses, params, tokenizer, examples: list[RetrievalExample],
                  batch_ways: int) -> list[float]:
  """Each example's mean next-token loss on its answer's tokens after its prompt (teacher
  forced): a graded retrieval measure where greedy accuracy is 0 or 1. Examples of equal total
  length run in one batch."""
  answers = [tokenizer.encode(example.answer).tolist() for example in examples]
  groups: dict = {}
  for index, (example, answer) in enumerate(zip(examples, answers)):
    groups.setdefault(len(example.prompt) + len(answer), []).append(index)
  result = [0.0] * len(examples)
  for indices in groups.values():
    tokens = np.array([examples[i].prompt + answers[i] for i in indices])
    losses = loss_by_position(token_losses, params, tokens, batch_ways)
    for row, index in enumerate(indices):
      result[index] = float(losses[row, -len(answers[index]):].mean())
  return result


def score(generator: Generator, tokenizer, examples: list[RetrievalExample],
          answer_loss: list[float]) -> dict:
  """{'accuracy', 'answer_loss': means, 'examples': [{'depths', 'answer', 'generated',
  'correct', 'answer_loss'}]}: each example's greedy continuation, correct when it starts with
  the answer."""
  generated = generator.generate([e.prompt for e in examples], ANSWER_TOKENS,
                                 batch_size=len(examples)).tokens
  records = []
  for example, ids, loss in zip(examples, generated, answer_loss):
    text = tokenizer.decode(ids)
    records.append({'depths': example.depths, 'answer': example.answer, 'generated': text,
                    'correct': text.startswith(example.answer), 'answer_loss': loss})
  return {'accuracy': float(np.mean([r['correct'] for r in records])),
          'answer_loss': float(np.mean(answer_loss)), 'examples': records}


# ---- the evaluation ---------------------------------------------------------------------------


def long_eval(workdir, lengths: list[int], step: int | None = None, examples: int = 8,
              mesh_config=None, tasks=tuple(TASKS), figures: bool = True) -> dict:
  """Evaluates checkpoint `step` (default: the latest) of the run in workdir at each length;
  prints one line per length and writes WORKDIR/long_eval/step_N.json (and PNGs)."""
  workdir = pathlib.Path(workdir)
  if not tasks:
    raise config_lib.ConfigError(f'--tasks names no task; choose from {list(TASKS)}.')
  for task in tasks:
    if task not in TASKS:
      raise config_lib.ConfigError(f'--tasks: {task!r} is not a task; choose from {list(TASKS)}.')
  if not lengths or min(lengths) < MIN_LENGTH:
    raise config_lib.ConfigError(f'--lengths={",".join(map(str, lengths))}: give lengths of at '
                                 f'least {MIN_LENGTH} tokens (room for the retrieval needles).')
  config, mesh, graphdef, params, step = restore_run(workdir, step, mesh_config,
                                                     check_eval_batch=False, check=check_text_run)
  tokenizer = load_tokenizer(config.data.tokenizer)
  generator = Generator(graphdef, params, config.model, mesh)
  token_losses = make_token_losses(graphdef, mesh)
  batch_ways = generator.batch_ways
  haystack = data_lib.load_split(config.data, 'heldout', config.model.vocab_size).stream

  result = {'step': step, 'train_seq_len': config.data.seq_len, 'rope_theta':
            config.model.rope_theta, 'rope_scaling': config.model.rope_scaling.to_dict(),
            'lengths': {}}
  progress = tqdm(total=len(lengths) * (1 + len(tasks)), desc='long_eval', unit='part',
                  file=sys.stdout, disable=jax.process_index() != 0)
  windows = heldout_examples(config.data, config.model.vocab_size, max(lengths), examples)
  for length in sorted(lengths):
    started = time.perf_counter()
    tokens = windows[:, :length + 1]
    with jax.set_mesh(mesh):
      losses = loss_by_position(token_losses, params, tokens, batch_ways)
    progress.update(1)
    edges = bucket_edges(length)
    entry = {'examples': len(tokens), 'loss': float(losses.mean()), 'bucket_edges': edges,
             'bucket_loss': bucket_means(losses, edges), 'retrieval': {}}
    for task in tasks:
      prompts = make_examples(task, tokenizer, haystack, length - ANSWER_TOKENS, examples)
      with jax.set_mesh(mesh):
        losses = answer_losses(token_losses, params, tokenizer, prompts, batch_ways)
      entry['retrieval'][task] = score(generator, tokenizer, prompts, losses)
      progress.update(1)
    entry['seconds'] = time.perf_counter() - started
    result['lengths'][str(length)] = entry
    if jax.process_index() == 0:  # tqdm.write prints whether or not the bar is shown.
      progress.write(f'length {length}: held-out loss {entry["loss"]:.3f} (last bucket '
                     f'{entry["bucket_loss"][-1]:.3f}); ' + ', '.join(
                         f'{task} {entry["retrieval"][task]["accuracy"]:.2f}' for task in tasks)
                     + ' (answer loss ' + ', '.join(
                         f'{entry["retrieval"][task]["answer_loss"]:.2f}' for task in tasks)
                     + f'; {entry["seconds"]:.1f}s)')
  progress.close()
  if jax.process_index() == 0:
    out_dir = workdir / 'long_eval'
    out_dir.mkdir(exist_ok=True)
    write_whole(out_dir / f'step_{step}.json', json.dumps(result, indent=2))
    if figures:
      from gated_attention import plots  # matplotlib only where figures are drawn.
      plots.long_eval_figures(result, out_dir, title=f'{workdir.name} step {step}')
    log(f'wrote {out_dir / f"step_{step}.json"} and its figures')
  return result


def comparison_tables(rows: dict[str, list[dict]]) -> str:
  """Markdown tables comparing long_eval results, one row per key of `rows` (a model and stage,
  its list holding one result per seed), one column per length: held-out loss over the window
  and in its last position bucket (from the largest power of two below L: [L/2, L) where L is
  a power of two), and per retrieval task the answer loss and greedy accuracy (the tasks all
  results share); each cell the mean over seeds, then every seed's value. ValueError if the
  results were evaluated at different lengths: each run's windows are cut from its longest
  length, so its loss at a shorter one depends on the set."""
  every = [result for results in rows.values() for result in results]
  length_sets = {tuple(sorted(result['lengths'], key=int)) for result in every}
  if len(length_sets) > 1:
    raise ValueError(f'the runs were evaluated at different lengths ({sorted(length_sets)}): '
                     'windows are cut from the longest, so re-run long_eval with one --lengths.')
  lengths = list(length_sets.pop())
  tasks = [task for task in every[0]['lengths'][lengths[0]]['retrieval']
           if all(task in result['lengths'][lengths[0]]['retrieval'] for result in every)]
  measures = [('held-out loss, whole window', lambda e: e['loss']),
              ('held-out loss, last position bucket [2^k, L), 2^k < L <= 2^(k+1)',
               lambda e: e['bucket_loss'][-1])]
  for task in tasks:
    measures += [(f'{task}: answer loss', lambda e, t=task: e['retrieval'][t]['answer_loss']),
                 (f'{task}: accuracy', lambda e, t=task: e['retrieval'][t]['accuracy'])]
  tables = []
  for title, measure in measures:
    lines = [f'{title}', '', '| run | ' + ' | '.join(lengths) + ' |',
             '|---|' + '---|' * len(lengths)]
    for name, results in rows.items():
      cells = []
      for length in lengths:
        values = [measure(r['lengths'][length]) for r in results]
        cells.append(f'{np.mean(values):.3f} (' + ', '.join(f'{v:.3f}' for v in values) + ')')
      lines.append(f'| {name} | ' + ' | '.join(cells) + ' |')
    tables.append('\n'.join(lines))
  return '\n\n'.join(tables)
