"""The ablation sweep: one table for many variants, resumable, and divergence reported."""

import json

import ml_collections
import pytest

from configs import ablation as ablation_config
from gated_attention import ablation
from gated_attention import config as config_lib
from gated_attention import resume
from gated_attention import state as state_lib
from tests import helpers


def _ablation_config(variants: str, learning_rates: str = '', steps: int = 4):
  config = helpers.run_config(steps=steps, log_every=2)
  config.variants = variants
  config.learning_rates = learning_rates
  config.lock()  # As config_flags hands it over.
  return config


def test_sweep_writes_the_table_and_resumes(tmp_path):
  config = _ablation_config('none,g1_headwise')
  results = ablation.run_ablation(config, tmp_path)
  heads, d_model, layers = config.model.num_heads, config.model.d_model, config.model.num_layers
  assert results['none']['added_params'] == 0
  assert results['g1_headwise']['added_params'] == layers * d_model * heads  # PAPER.md's formula.
  assert results['none']['eval']['gate_score'] is None
  assert 0 < results['g1_headwise']['eval']['gate_score']['mean'] < 1
  report = (tmp_path / 'report.md').read_text()
  assert '| none | +0 |' in report and f'| g1_headwise | +{layers * d_model * heads} |' in report
  assert 'Held-out loss is nats per byte-level token' in report
  other = config.copy_and_resolve_references()
  other.data.tokenizer = 'runs/bpe/tokenizer.json'
  assert 'nats per token of runs/bpe/tokenizer.json' in ablation.report(results, other)
  assert json.loads((tmp_path / 'results.json').read_text()) == results
  assert (tmp_path / 'loss_curves.png').exists() and (tmp_path / 'first_token_attention.png').exists()

  # A rerun skips finished runs; an interrupted one resumes from its checkpoint.
  finished = tmp_path / 'runs' / 'none' / 'result.json'
  before = finished.stat().st_mtime_ns
  (tmp_path / 'runs' / 'g1_headwise' / 'result.json').unlink()
  again = ablation.run_ablation(config, tmp_path)
  assert finished.stat().st_mtime_ns == before
  assert again['g1_headwise']['eval'] == results['g1_headwise']['eval']

  # A finished run whose config has changed since (more steps) continues and is evaluated anew.
  longer = ablation.run_ablation(_ablation_config('none', steps=6), tmp_path)
  assert longer['none']['eval']['step'] == 6 and longer['none']['loss_curve'][-1][0] == 6
  assert longer['none']['config']['train']['steps'] == 6
  assert longer['none']['continued_from_steps'] == 4


def test_a_finished_run_is_kept_evaluated_again_continued_or_refused_by_what_changed(tmp_path):
  run_config = ablation.variant_config(_ablation_config('none'), 'none', 1e-3)
  finished = resume.plain(run_config)
  changed = lambda **keys: ml_collections.ConfigDict(
      {**run_config.to_dict(), **{block: {**run_config[block].to_dict(), **values}
                                  for block, values in keys.items()}})
  assert ablation.rerun(None, run_config, tmp_path) is None  # From before rows kept a config.
  assert ablation.rerun(finished, run_config, tmp_path) is None
  assert ablation.rerun(finished, changed(mesh={'fsdp': 2}, train={'log_every': 1}),
                        tmp_path) is None
  assert ablation.rerun(finished, changed(eval={'batches': 3}), tmp_path) == 'evaluate'
  assert ablation.rerun(finished, changed(train={'steps': 6}), tmp_path) == 'continue'
  for keys, named in (({'train': {'steps': 2}}, 'train.steps: 4 -> 2'),
                      ({'train': {'learning_rate': 5e-3}}, 'train.learning_rate: 0.001 -> 0.005')):
    with pytest.raises(config_lib.ConfigError, match=f'finished with another config \\({named}\\); '
                                                     'its checkpoints were trained that way'):
      ablation.rerun(finished, changed(**keys), tmp_path)


def test_divergence_is_reported_not_raised(tmp_path):
  config = _ablation_config('g1_elementwise', learning_rates='3e-3,1e12')
  results = ablation.run_ablation(config, tmp_path)
  assert set(results) == {'g1_elementwise_lr0.003', 'g1_elementwise_lr1e+12'}
  assert results['g1_elementwise_lr0.003']['diverged'] is None
  assert 'Non-finite loss' in results['g1_elementwise_lr1e+12']['diverged']
  assert '| g1_elementwise_lr1e+12 | – | 1e+12 | diverged at step' in (
      tmp_path / 'report.md').read_text()


def test_a_finite_loss_above_chance_is_reported_as_diverged(tmp_path, monkeypatch):
  """A held-out loss above ln(vocab_size) is worse than a uniform guess: not a table row."""
  monkeypatch.setattr(ablation, 'train', lambda config, workdir: {'preempted': False})
  config = _ablation_config('g1_elementwise', '')
  for loss, diverged in ((5.9, False), (351.0, True)):
    monkeypatch.setattr(ablation, 'evaluate', lambda workdir, figures: {'loss': loss})
    row = ablation.run_variant(ablation.variant_config(config, 'g1_elementwise', 1e-3), tmp_path)
    assert bool(row['diverged']) == diverged
  assert row['diverged'] == 'held-out loss 351 is above chance, ln(model.vocab_size) = 5.951'


@pytest.mark.parametrize('variants, learning_rates, message', [
    ('none,g9', '', "--config.variants: 'g9' does not start with a known gate variant"),
    ('none+num_kv_heads', '', "'none\\+num_kv_heads': 'num_kv_heads' is not KEY=VALUE"),
    ('none', '2e-3,fast', "learning_rates='2e-3,fast': expected comma-separated floats"),
    (',', '', "variants=',' names nothing"),
    ('none,g1_elementwise,none', '', 'name the run none more than once'),
    ('none', '1e-3,0.0010000001', 'name the run none_lr0.001 more than once'),
    ('none', '1e-3,nan', '--config.learning_rates: nan is not a learning rate'),
    ('none', '1e-3,-1e-3', '--config.learning_rates: -0.001 is not a learning rate'),
])
def test_bad_sweeps_are_named(variants, learning_rates, message, tmp_path):
  """Refused before any run starts."""
  with pytest.raises(config_lib.ConfigError, match=message):
    ablation.run_ablation(_ablation_config(variants, learning_rates), tmp_path)
  assert not (tmp_path / 'runs').exists()


def test_default_ablation_config_covers_the_paper_rows():
  config = ablation_config.get_config()
  names = [name for name, _, _ in ablation.sweep(config)]
  assert names == [*ablation_config.PAPER_ROWS, 'none+num_heads=6', 'none+num_kv_heads=4']
  # The parameter-matched baselines add what G1 elementwise adds: layers x d_model x q x d_k.
  params = {name: state_lib.num_params(state_lib.abstract_model(
      ablation.variant_config(config, name, 1e-3).model)[1]) for name in names}
  model = config.model
  g1 = model.num_layers * model.d_model * model.num_heads * model.head_dim
  for name in ('g1_elementwise', 'none+num_heads=6', 'none+num_kv_heads=4'):
    assert params[name] - params['none'] == g1


def test_a_run_takes_the_model_keys_after_its_name():
  config = _ablation_config('none+num_kv_heads=4,g1_elementwise+gate.activation=ns_sigmoid')
  runs = {name: ablation.variant_config(config, variant, rate)
          for name, variant, rate in ablation.sweep(config)}
  assert runs['none+num_kv_heads=4'].model.num_kv_heads == 4
  assert runs['none+num_kv_heads=4'].model.gate.position == 'none'
  gate = runs['g1_elementwise+gate.activation=ns_sigmoid'].model.gate
  assert (gate.position, gate.activation) == ('sdpa', 'ns_sigmoid')
  assert runs['g1_elementwise+gate.activation=ns_sigmoid'].model.num_kv_heads == 2


@pytest.mark.parametrize('variant, message', [
    ('none+heads=4', r"model.heads is not a model key with a value"),
    ('none+gate=g1', r"model.gate is not a model key with a value"),
    ('none+num_kv_heads=four', r"model.num_kv_heads='four': expected an integer"),
    ('none+qk_norm=maybe', r"model.qk_norm='maybe': expected true or false"),
])
def test_bad_model_keys_of_a_run_are_named(variant, message):
  with pytest.raises(config_lib.ConfigError, match=message):
    ablation.variant_config(_ablation_config(variant), variant, 1e-3)
