"""The paper's measurements against hand-computed cases, and the eval command end to end."""

import json
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from gated_attention.checkpoint import Checkpointer
from gated_attention.evaluate import evaluate, make_eval_step, summarize_measurements
from gated_attention.tokenizer import ByteTokenizer
from gated_attention.train import train
from tests import helpers


def _measure(model, tokens):
  graphdef, params = nnx.split(model)
  out = make_eval_step(graphdef, analysis=True, pad_id=ByteTokenizer.pad_id)(
      nnx.to_pure_dict(params), tokens)
  gate = model.blocks[0].attention.gate
  activation = gate.activation if gate.enabled else None
  return summarize_measurements([jax.device_get(out)], activation)


def _set_all(model, path_suffix, value_fn):
  """Sets every parameter whose path ends with path_suffix to value_fn(current value)."""
  for path, variable in nnx.to_flat_state(nnx.state(model)):
    if path[-len(path_suffix):] == path_suffix:
      variable[...] = value_fn(variable[...])


def test_first_token_attention_of_uniform_attention():
  """Zero query weights make every score equal: query i puts 1 / (i + 1) on the first token."""
  model = helpers.transformer(helpers.model_config('none'))
  _set_all(model, ('attention', 'wq'), jnp.zeros_like)
  tokens = helpers.random_tokens(0, length=11)  # The model reads tokens[:, :-1]: 10 positions.
  measured = _measure(model, tokens)['first_token_attention']
  expected = np.mean([1 / (i + 1) for i in range(1, 10)])  # Queries 1..9; query 0 is excluded.
  np.testing.assert_allclose(measured['per_layer_head'], expected, rtol=1e-5)
  np.testing.assert_allclose(measured['mean'], expected, rtol=1e-5)


def test_max_activation_of_a_residual_stream_that_carries_only_embeddings():
  """With zero output projections every layer's hidden state is the token embedding."""
  model = helpers.transformer(helpers.model_config('g1_elementwise'))
  _set_all(model, ('attention', 'wo'), jnp.zeros_like)
  _set_all(model, ('mlp', 'wo'), jnp.zeros_like)
  tokens = helpers.random_tokens(1)
  measured = _measure(model, tokens)['max_activation']
  expected = np.abs(np.asarray(model.embedding[...])[np.asarray(tokens)[:, :-1]]).max()
  np.testing.assert_allclose(measured['per_layer'], expected, rtol=1e-6)
  np.testing.assert_allclose(measured['mean_of_layer_max'], expected, rtol=1e-6)


@pytest.mark.parametrize('variant, expected', [('g1_elementwise', 0.5), ('g1_ns_sigmoid', 0.75),
                                               ('g2_headwise', 0.5)])
def test_gate_score_of_zero_gate_weights(variant, expected):
  cfg = helpers.model_config(variant)
  model = helpers.transformer(cfg)
  name = 'wv' if variant.startswith('g2') else 'wq'
  _set_all(model, ('attention', name), lambda w: w.at[..., cfg.head_dim:].set(0.0))
  gate_score = _measure(model, helpers.random_tokens(2))['gate_score']
  np.testing.assert_allclose(gate_score['per_layer'], expected, rtol=1e-6)
  edges, counts = map(np.asarray, (gate_score['histogram']['edges'],
                                   gate_score['histogram']['counts']))
  bin_index = np.searchsorted(edges, expected, side='right') - 1
  assert counts[bin_index] == counts.sum() > 0


def test_baseline_has_no_gate_score():
  assert _measure(helpers.transformer(helpers.model_config('none')),
                  helpers.random_tokens(3))['gate_score'] is None


def test_measurements_combine_batches():
  batch = lambda fta, act: {'first_token_attention': np.full((2, 3), fta),
                            'max_activation': np.array([act, 2 * act])}
  combined = summarize_measurements([batch(0.2, 1.0), batch(0.4, 5.0)], None)
  np.testing.assert_allclose(combined['first_token_attention']['mean'], 0.3)
  assert combined['max_activation']['per_layer'] == [5.0, 10.0]
  assert combined['max_activation']['mean_of_layer_max'] == 7.5


def test_eval_command_writes_json_and_figures(tmp_path):
  config = helpers.run_config(steps=4)
  train(config, tmp_path)
  result = evaluate(tmp_path)
  saved = json.loads((tmp_path / 'eval' / 'step_4.json').read_text())
  assert saved == result
  assert saved['step'] == 4
  assert saved['tokens'] == config.eval.batches * config.eval.batch_size * config.data.seq_len
  np.testing.assert_allclose(saved['perplexity'], np.exp(saved['loss']))
  assert len(saved['first_token_attention']['per_layer']) == config.model.num_layers
  assert 0 < saved['gate_score']['mean'] < 1
  pictures = sorted(p.name for p in (tmp_path / 'eval').glob('*.png'))
  assert pictures == ['step_4_first_token_attention.png', 'step_4_first_token_attention_heads.png',
                      'step_4_gate_score_histogram.png', 'step_4_max_activation.png']


def test_eval_reads_the_new_latest_checkpoint_when_one_is_rotated_away(tmp_path, monkeypatch):
  train(helpers.run_config(steps=4, checkpoint_every=2), tmp_path)
  restore_params = Checkpointer.restore_params

  def rotated_away_while_read(self, step, abstract_params):
    if step == 4:  # The trainer removes step 4 as eval starts reading it.
      shutil.rmtree(tmp_path / 'checkpoints' / '4')
    return restore_params(self, step, abstract_params)

  monkeypatch.setattr(Checkpointer, 'restore_params', rotated_away_while_read)
  assert evaluate(tmp_path, figures=False)['step'] == 2
