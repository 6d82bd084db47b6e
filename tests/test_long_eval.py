"""Long-context evaluation: the retrieval tasks' rules, the position-bucket loss against NumPy,
and the command end to end on a tiny random model."""

import json
import re
import sys

import numpy as np
import pytest

from gated_attention import checkpoint as checkpoint_lib
from gated_attention import config as config_lib
from gated_attention import long_eval
from gated_attention import state as state_lib
from gated_attention.data import DataError
from gated_attention.model import apply
from gated_attention.tokenizer import ByteTokenizer
from tests import helpers

TOKENIZER = ByteTokenizer()
# A haystack full of 5-digit numbers and assignments: values and names must avoid them.
HAYSTACK = TOKENIZER.encode(''.join(f'x_{i} = {10_000 + 7 * i}  # KEY_ABCD VAR_\n'
                                    for i in range(2000)))


def test_position_buckets_double_from_16_to_the_length():
  assert long_eval.bucket_edges(256) == [0, 16, 32, 64, 128, 256]
  assert long_eval.bucket_edges(100) == [0, 16, 32, 64, 100]


@pytest.mark.parametrize('task', sorted(long_eval.TASKS))
def test_each_prompt_has_its_length_and_its_answer_exactly_once(task):
  length = 512
  examples = long_eval.make_examples(task, TOKENIZER, HAYSTACK, length, count=5)
  for example in examples:
    text = TOKENIZER.decode(example.prompt)
    assert len(example.prompt) == length and example.prompt[0] == TOKENIZER.bos_id
    assert len(example.answer) == 5 and text.count(example.answer) == 1
  assert len({e.answer for e in examples}) == len(examples)


def test_the_passkey_sits_at_its_depth_and_the_prompt_asks_for_it():
  examples = long_eval.make_examples('passkey', TOKENIZER, HAYSTACK, 1024, count=5)
  for example, depth in zip(examples, (0.05, 0.275, 0.5, 0.725, 0.95)):
    text = TOKENIZER.decode(example.prompt)  # BOS dropped: text index i is prompt position i + 1.
    at = text.index(f'\nPASSKEY = {example.answer}\n') + 1
    assert abs(at / 1023 - depth) < 0.03, (at, depth)
    assert text.endswith('\nPASSKEY = ') and text.count('PASSKEY') == 2


def _assignments(text: str) -> dict:
  return dict(re.findall(r'^((?:KEY|VAR)_[A-Z]{4}) = (\w+)$', text, flags=re.MULTILINE))


def test_multikey_asks_for_one_of_four_distinct_keys():
  for example in long_eval.make_examples('multikey', TOKENIZER, HAYSTACK, 1024, count=4):
    text = TOKENIZER.decode(example.prompt)
    keys = _assignments(text)
    asked = text.rsplit('\n', 1)[1].removesuffix(' = ')
    assert len(keys) == 4 and len(set(keys.values())) == 4
    assert keys[asked] == example.answer
    assert all(text.count(name) == 1 + (name == asked) for name in keys)


def test_variable_tracking_answer_is_the_value_at_the_end_of_the_chain():
  for example in long_eval.make_examples('variable_tracking', TOKENIZER, HAYSTACK, 1024, 4):
    text = TOKENIZER.decode(example.prompt)
    assigned = _assignments(text)
    name = re.search(r'assert (VAR_[A-Z]{4}) == $', text).group(1)
    hops = 0
    while name in assigned:  # Each variable is defined before it is used.
      assert text.index(f'\n{name} = ') < text.rindex(name)
      name, hops = assigned[name], hops + 1
    assert hops == long_eval.VARIABLE_HOPS and name == example.answer


def _tiny_model():
  model = helpers.model_config('g1_elementwise', attention_impl='chunked', vocab_size=259)
  return state_lib.abstract_model(model)[0], helpers.random_params(model, std=0.1)


def _numpy_token_losses(graphdef, params, tokens: np.ndarray) -> np.ndarray:
  """-log p(token t + 1 | tokens <= t) [batch, length - 1], from the model's logits in NumPy."""
  logits = np.asarray(apply(graphdef, params, tokens[:, :-1]).logits, np.float64)
  shifted = logits - logits.max(-1, keepdims=True)
  log_probs = shifted - np.log(np.exp(shifted).sum(-1, keepdims=True))
  return -np.take_along_axis(log_probs, tokens[:, 1:, None], axis=-1)[..., 0]


def test_position_bucket_loss_is_the_mean_of_each_buckets_token_losses():
  """11 examples: two calls of 8 rows, the second padded."""
  graphdef, params = _tiny_model()
  tokens = np.asarray(helpers.random_tokens(0, batch=11, length=101))
  token_losses = long_eval.make_token_losses(graphdef, helpers.one_device_mesh())
  losses = long_eval.loss_by_position(token_losses, params, tokens, batch_ways=2)
  nll = _numpy_token_losses(graphdef, params, tokens)
  expected = [nll[:, 0:16].mean(), nll[:, 16:32].mean(), nll[:, 32:64].mean(),
              nll[:, 64:100].mean()]
  np.testing.assert_allclose(long_eval.bucket_means(losses, long_eval.bucket_edges(100)),
                             expected, rtol=1e-5)


def test_answer_loss_is_the_mean_loss_of_the_answer_after_its_prompt():
  graphdef, params = _tiny_model()
  examples = long_eval.make_examples('multikey', TOKENIZER, HAYSTACK, 128, count=2)
  token_losses = long_eval.make_token_losses(graphdef, helpers.one_device_mesh())
  losses = long_eval.answer_losses(token_losses, params, TOKENIZER, examples, batch_ways=1)
  for example, loss in zip(examples, losses):
    tokens = np.array([example.prompt + [ord(digit) for digit in example.answer]])
    np.testing.assert_allclose(loss, _numpy_token_losses(graphdef, params, tokens)[0, -5:].mean(),
                               rtol=1e-5)


def test_a_retrieval_is_correct_when_the_continuation_starts_with_the_answer():
  """Accuracy over a stand-in generator's continuations: the answer then anything counts, the
  answer later or one digit off does not; the answer loss is the mean given."""
  byte = ByteTokenizer()
  examples = [long_eval.RetrievalExample('passkey', [1, 2], answer, [0.5])
              for answer in ('12345', '67890', '24680', '13579')]
  continuations = ['12345 and on', 'the value 67890', '24681', '13579']

  class Generator:
    def generate(self, prompts, max_new_tokens, batch_size):
      assert prompts == [[1, 2]] * 4 and max_new_tokens == long_eval.ANSWER_TOKENS
      return type('Generation', (), {'tokens': [list(byte.encode(text)) for text in
                                                continuations]})

  scored = long_eval.score(Generator(), byte, examples, [1.0, 2.0, 3.0, 6.0])
  assert [record['correct'] for record in scored['examples']] == [True, False, False, True]
  assert scored['accuracy'] == 0.5 and scored['answer_loss'] == 3.0
  assert [record['generated'] for record in scored['examples']] == continuations


def test_the_command_writes_json_and_figures_and_refuses_bad_lengths(tmp_path):
  config = config_lib.base_config('tiny', 'g1_elementwise')
  config.model.update(d_model=32, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=8,
                      mlp_dim=64)
  config.data.seq_len = 64
  helpers.random_workdir(tmp_path, config, std=0.05)
  result = helpers.run([sys.executable, '-m', 'experiments.long_eval', f'--workdir={tmp_path}',
                        '--lengths=128,256', '--examples=2'])
  assert result.returncode == 0, result.stderr[-2000:]
  written = json.loads((tmp_path / 'long_eval' / 'step_0.json').read_text())
  assert sorted(written['lengths']) == ['128', '256']
  entry = written['lengths']['256']
  assert entry['bucket_edges'] == [0, 16, 32, 64, 128, 256] and len(entry['bucket_loss']) == 5
  assert sorted(entry['retrieval']) == sorted(long_eval.TASKS)
  assert all(len(task['examples']) == 2 and task['answer_loss'] > 0
             for task in entry['retrieval'].values())
  for figure in ('loss_by_position', 'retrieval'):
    assert (tmp_path / 'long_eval' / f'step_0_{figure}.png').stat().st_size > 0

  refused = helpers.run([sys.executable, '-m', 'experiments.long_eval', f'--workdir={tmp_path}',
                         '--lengths=64,1k'])
  assert refused.stderr.strip().splitlines() == [
      'error: --lengths=64,1k: give integers, e.g. 256,512,1024.'] and refused.returncode == 1
  refused = helpers.run([sys.executable, '-m', 'experiments.long_eval', f'--workdir={tmp_path}',
                         '--lengths=64,256'])
  assert refused.stderr.strip().splitlines() == [
      'error: --lengths=64,256: give lengths of at least 128 tokens (room for the retrieval '
      'needles).'] and refused.returncode == 1
  refused = helpers.run([sys.executable, '-m', 'experiments.long_eval', f'--workdir={tmp_path}',
                         '--lengths=256', '--tasks='])
  assert refused.stderr.strip().splitlines() == [
      f"error: --tasks names no task; choose from {list(long_eval.TASKS)}."]


def test_a_length_past_the_held_out_split_names_the_lengths_asked(tmp_path):
  for name in ('a.txt', 'b.txt'):
    (tmp_path / name).write_text('x' * 300)
  data = config_lib.base_config('tiny').data
  data.update(source='text_files', path=str(tmp_path / '*.txt'))
  with pytest.raises(DataError, match=re.escape(
      'the held-out split has 301 tokens, fewer than the longest length asked (512): ask for '
      'lengths up to 301')):
    long_eval.heldout_examples(data, 384, 512, 2)


@pytest.mark.parametrize('source, held', [
    ('array_record', 'pre-tokenized examples of one fixed length'),
    ('bigram_backcopy', 'synthetic token sequences, not text')])
def test_a_run_trained_on_other_than_text_is_refused_before_its_checkpoint_loads(
    tmp_path, monkeypatch, source, held):
  config = config_lib.base_config('tiny')
  config.data.source = source
  if source == 'array_record':
    config.data.update(path=str(tmp_path / 'train*.ar'), eval_path=str(tmp_path / 'held*.ar'))
  helpers.random_workdir(tmp_path, config)
  monkeypatch.setattr(checkpoint_lib.Checkpointer, 'restore_params',
                      lambda *args: pytest.fail('the checkpoint was read'))
  with pytest.raises(DataError, match=f'the run\'s data.source={source} holds {held}. It '
                                      'evaluates runs trained on data.source embedded or '
                                      'text_files'):
    long_eval.long_eval(tmp_path, [256])


def test_comparison_tables_average_the_seeds_of_each_row():
  def result(loss, accuracy, tasks=('passkey',)):
    entry = {'loss': loss, 'bucket_loss': [9.0, loss + 1],
             'retrieval': {task: {'answer_loss': 2 * loss, 'accuracy': accuracy}
                           for task in tasks}}
    return {'lengths': {'128': entry, '256': entry}}

  text = long_eval.comparison_tables({'g1 extend': [result(1.0, 0.5), result(2.0, 1.0)],
                                      'none extend': [result(3.0, 0.0, ('passkey', 'multikey'))]})
  assert 'multikey' not in text  # Only the tasks every result holds.
  short = {'lengths': {'128': result(1.0, 0.5)['lengths']['128']}}
  with pytest.raises(ValueError, match='evaluated at different lengths'):
    long_eval.comparison_tables({'g1 extend': [result(1.0, 0.5), short]})
  assert '| g1 extend | 1.500 (1.000, 2.000) | 1.500 (1.000, 2.000) |' in text
  assert '| none extend | 4.000 (4.000) | 4.000 (4.000) |' in text  # The last bucket.
  assert '| g1 extend | 0.750 (0.500, 1.000) | 0.750 (0.500, 1.000) |' in text


def test_the_table_command_skips_runs_not_named_for_it_and_keeps_the_shared_tasks(tmp_path):
  def write(run, tasks):
    entry = {'loss': 1.0, 'bucket_loss': [1.0],
             'retrieval': {task: {'answer_loss': 1.0, 'accuracy': 0.5} for task in tasks}}
    (tmp_path / run / 'long_eval').mkdir(parents=True)
    (tmp_path / run / 'long_eval' / 'step_3.json').write_text(
        json.dumps({'lengths': {'128': entry}}))

  write('g1_elementwise_s0_extend', ('passkey', 'multikey'))
  write('g1_elementwise_s1_extend', ('passkey',))
  write('scratch', ('passkey',))
  result = helpers.run([sys.executable, '-m', 'experiments.long_context_table',
                        f'--runs={tmp_path}'])
  assert result.returncode == 0, result.stderr[-2000:]
  assert 'warning: skipped scratch: not named <gate>_s<seed>_<stage>' in result.stderr
  assert '| g1_elementwise extend | 1.000 (1.000, 1.000) |' in result.stdout
  assert 'passkey: accuracy' in result.stdout and 'multikey' not in result.stdout
  # A result cut short (long_eval killed while it wrote, before results were written whole).
  (tmp_path / 'g1_elementwise_s1_extend' / 'long_eval' / 'step_4.json').write_text('{"leng')
  result = helpers.run([sys.executable, '-m', 'experiments.long_context_table',
                        f'--runs={tmp_path}'])
  assert result.returncode == 1 and 'Traceback' not in result.stderr
  assert re.search(r'error: .*g1_elementwise_s1_extend/long_eval/step_4.json: cannot read it as '
                   r'a long_eval result', result.stderr), result.stderr
