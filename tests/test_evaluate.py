"""The paper's measurements against hand-computed cases, and the eval command end to end."""

import json
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from gated_attention import checkpoint as checkpoint_lib
from gated_attention.checkpoint import CheckpointError, Checkpointer
from gated_attention.evaluate import (combine_attention_maps, evaluate, make_eval_step,
                                      restore_run, summarize_measurements)
from gated_attention.tokenizer import ByteTokenizer
from gated_attention.train import train
from tests import helpers


def _measure(model, tokens, triggers=None):
  graphdef, params = nnx.split(model)
  out = make_eval_step(graphdef, analysis=True, pad_id=ByteTokenizer.pad_id, triggers=triggers)(
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


def test_first_token_attention_split_by_query_type():
  """With uniform attention (zero query weights) query i puts 1 / (i + 1) on the first token, so
  each query type's mean is the mean of 1 / (i + 1) over the positions i >= 1 whose input token
  is (or is not) a trigger."""
  model = helpers.transformer(helpers.model_config('none'))
  _set_all(model, ('attention', 'wq'), jnp.zeros_like)
  tokens = helpers.random_tokens(4, batch=3, length=21, vocab=6)
  triggers = np.array([1, 4])
  measured = _measure(model, tokens, triggers)['first_token_attention']
  inputs = np.asarray(tokens)[:, :-1]
  expected = {}
  for kind, wanted in (('trigger', True), ('non_trigger', False)):
    values = [1 / (i + 1) for row in inputs for i in range(1, len(row))
              if (row[i] in triggers) == wanted]
    expected[kind] = np.mean(values)
  cfg = model.blocks[0].attention
  shape = (len(model.blocks), cfg.wq.shape[1])
  for kind in ('trigger', 'non_trigger'):
    np.testing.assert_allclose(measured[kind], np.full(shape, expected[kind]), rtol=1e-5)
  assert expected['trigger'] != pytest.approx(expected['non_trigger'])  # The split has power.
  # Without triggers there is no split, only all queries.
  assert not {'trigger', 'non_trigger'} & set(_measure(model, tokens)['first_token_attention'])


def test_value_norm_of_the_first_token_and_the_others():
  """value_norm is |v| = |RMSNorm(embedding) @ W_v| per KV head, at position 0 and averaged
  over the others, computed here in NumPy for the first layer (its input is the embedding)."""
  cfg = helpers.model_config('none')
  model = helpers.transformer(cfg)
  tokens = helpers.random_tokens(5, batch=2, length=9)
  measured = _measure(model, tokens)['value_norm']
  x = np.asarray(model.embedding[...])[np.asarray(tokens)[:, :-1]]
  block = model.blocks[0]
  x = x / np.sqrt(np.mean(x**2, axis=-1, keepdims=True) + cfg.norm_eps)
  x = x * np.asarray(block.attention_norm.scale[...])
  v = np.einsum('bte,ekd->btkd', x, np.asarray(block.attention.wv[...]))
  norms = np.linalg.norm(v, axis=-1)  # [batch, length, kv_heads]
  np.testing.assert_allclose(measured['first_token'][0], norms[:, 0].mean(0), rtol=1e-4)
  np.testing.assert_allclose(measured['others'][0], norms[:, 1:].mean((0, 1)), rtol=1e-4)


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


@pytest.mark.parametrize('variant', ['g1_elementwise', 'g5'])
def test_padding_is_not_measured(variant):
  """Causal attention leaves every real position of a sequence unchanged by PAD after it, so
  the measurements of a padded sequence are those of the same real tokens alone."""
  model = helpers.transformer(helpers.model_config(variant))
  tokens = np.asarray(helpers.random_tokens(6, batch=1, length=12))
  # Inputs 0..10 are real in both; the padded one reads 9 PADs after them.
  padded = np.concatenate([tokens[:, :11], np.full((1, 10), ByteTokenizer.pad_id)], axis=1)
  plain, with_padding = _measure(model, jnp.asarray(tokens)), _measure(model, jnp.asarray(padded))
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5), plain, with_padding)
  graphdef, params = nnx.split(model)
  maps = [make_eval_step(graphdef, True, ByteTokenizer.pad_id)(
      nnx.to_pure_dict(params), jnp.asarray(t))['attention_map'] for t in (tokens, padded)]
  np.testing.assert_allclose(maps[1][:, :, :11, :11], maps[0], rtol=1e-5)
  np.testing.assert_array_equal(maps[1][:, :, 11:], 0.0)  # No measured query there.


def test_measurements_combine_batches():
  """Query types and value norms combine by counts across batches, not by batch means."""
  def batch(fta, trigger_queries, act):
    return {'first_token_attention_sum': {'all': np.full((2, 3), fta * 10),
                                          'trigger': np.full((2, 3), fta * trigger_queries),
                                          'non_trigger': np.full((2, 3), 0.0)},
            'query_count': {'all': 10, 'trigger': trigger_queries,
                            'non_trigger': 10 - trigger_queries},
            'value_norm_first_token': np.ones((2, 1)),
            # |v| of norm act at each of a batch's 10 - trigger_queries real positions.
            'value_norm_others_sum': np.full((2, 1), act * (10 - trigger_queries)),
            'value_norm_count': 10 - trigger_queries,
            'max_activation': np.array([act, 2 * act]),
            # Two layers; gate scores summed over the batch's measured positions, and counted.
            'gate_score_sum': np.array([act, 0.0]),
            'gate_score_histogram': np.array([[trigger_queries, 0], [0, trigger_queries]])}
  combined = summarize_measurements([batch(0.2, 1, 1.0), batch(0.4, 3, 5.0)], 'sigmoid')
  np.testing.assert_allclose(combined['first_token_attention']['mean'], 0.3)
  np.testing.assert_allclose(combined['first_token_attention']['trigger'], (0.2 + 1.2) / 4)
  np.testing.assert_allclose(combined['first_token_attention']['non_trigger'], 0.0)
  assert combined['max_activation']['per_layer'] == [5.0, 10.0]
  assert combined['max_activation']['mean_of_layer_max'] == 7.5
  # (1 * 9 + 5 * 7) / 16 positions, not the batch means' (1 + 5) / 2.
  np.testing.assert_allclose(combined['value_norm']['others'], np.full((2, 1), 44 / 16))
  # Gate scores combine by their counts: layer 0 has (1 + 5) / (1 + 3), not the batch means' mean.
  np.testing.assert_allclose(combined['gate_score']['per_layer'], [1.5, 0.0])
  assert combined['gate_score']['histogram']['counts'] == [4, 4]


def test_attention_maps_combine_batches_by_each_rows_queries():
  """Row 1 of the second batch is all padding (no query measured, a zero row): the combined
  row is the first batch's; row 0 weighs 3 queries against 1."""
  first = np.array([[0.6, 0.4], [0.5, 0.5]])[None, None]  # [layers, heads, m, m]
  second = np.array([[1.0, 0.0], [0.0, 0.0]])[None, None]
  combined = combine_attention_maps([
      {'attention_map': first, 'attention_map_queries': np.array([3, 2])},
      {'attention_map': second, 'attention_map_queries': np.array([1, 0])}])
  np.testing.assert_allclose(combined[0, 0], [[0.7, 0.3], [0.5, 0.5]], rtol=1e-6)


def test_eval_command_writes_json_and_figures(tmp_path):
  config = helpers.run_config(steps=4)
  config.eval.analysis_batches = 2
  train(config, tmp_path)
  result = evaluate(tmp_path)
  saved = json.loads((tmp_path / 'eval' / 'step_4.json').read_text())
  assert saved == result
  assert saved['step'] == 4
  assert saved['tokens'] == config.eval.batches * config.eval.batch_size * config.data.seq_len
  np.testing.assert_allclose(saved['perplexity'], np.exp(saved['loss']))
  assert len(saved['first_token_attention']['per_layer']) == config.model.num_layers
  assert 0 < saved['gate_score']['mean'] < 1
  assert not {'trigger', 'non_trigger'} & set(saved['first_token_attention'])  # No triggers.
  pictures = sorted(p.name for p in (tmp_path / 'eval').glob('*.png'))
  assert pictures == ['step_4_attention_maps.png', 'step_4_first_token_attention.png',
                      'step_4_first_token_attention_heads.png', 'step_4_gate_score_histogram.png',
                      'step_4_max_activation.png']
  maps = np.load(tmp_path / 'eval' / 'step_4_attention_maps.npy')
  assert maps.shape == (config.model.num_layers, config.model.num_heads, config.data.seq_len,
                        config.data.seq_len)
  np.testing.assert_allclose(maps.sum(-1), 1, rtol=1e-5)  # Rows of attention are distributions.
  # Fewer batches than the run's eval.analysis_batches: the analysis takes what there is.
  assert evaluate(tmp_path, batches=1, figures=False)['tokens'] == (config.eval.batch_size
                                                                     * config.data.seq_len)


def test_eval_reads_the_new_latest_checkpoint_when_one_is_rotated_away(tmp_path, monkeypatch):
  train(helpers.run_config(steps=4, checkpoint_every=2), tmp_path)
  restore_params = Checkpointer.restore_params

  def rotated_away_while_read(self, step, abstract_params):
    if step == 4:  # The trainer removes step 4 as eval starts reading it.
      shutil.rmtree(tmp_path / 'checkpoints' / '4')
    return restore_params(self, step, abstract_params)

  monkeypatch.setattr(Checkpointer, 'restore_params', rotated_away_while_read)
  assert evaluate(tmp_path, figures=False)['step'] == 2


def test_a_run_is_restored_with_the_config_of_its_step_not_the_workdirs_config_json(tmp_path):
  """generate, long_eval and export_hf read the config saved with the step; a config.json that
  is not a run's config is named, not filled with defaults."""
  config = helpers.run_config(steps=2)
  config.model.rope_theta = 500.0
  helpers.random_workdir(tmp_path, config)
  (tmp_path / 'config.json').write_text('{}')
  restored, _, _, _, step = restore_run(tmp_path, check_eval_batch=False)
  assert (restored.model.rope_theta, step) == (500.0, 0)
  with pytest.raises(CheckpointError, match='config.json is not a run.s config'):
    checkpoint_lib.load_config(tmp_path)


def test_a_run_trained_with_another_platforms_kernel_is_evaluated_with_one_that_runs_here(
    tmp_path, capsys):
  config = helpers.run_config(steps=2)
  config.model.update(attention_impl='cudnn', dtype='bfloat16')  # As trained on a GPU.
  helpers.random_workdir(tmp_path, config)
  result = evaluate(tmp_path, batches=1, figures=False)
  assert np.isfinite(result['loss'])
  assert ('model.attention_impl=cudnn (as trained) does not run on cpu; attention runs as auto'
          in capsys.readouterr().out)
