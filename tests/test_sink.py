"""The sink comparison: one table over variants and seeds, curves and figures, resumable."""

import json
import sys

import numpy as np
from gated_attention import sink
from tests import helpers


def _sink_config(variants: str):
  config = helpers.run_config(steps=4, checkpoint_every=2, keep_checkpoints=10, log_every=2)
  config.data.update(source='bigram_backcopy', seq_len=32)
  config.eval.analysis_batches = sink.CURVE_BATCHES  # The curve's last point is the final eval.
  config.variants = variants
  config.learning_rates = ''
  config.lock()  # As config_flags hands it over.
  return config


def test_comparison_writes_results_per_variant_and_seed(tmp_path):
  config = _sink_config('none,g1_headwise')
  results = sink.run_sink_comparison(config, tmp_path, seeds=[0, 1])
  assert set(results) == {'none', 'g1_headwise'}
  layers, heads = config.model.num_layers, config.model.num_heads
  for name, by_seed in results.items():
    assert set(by_seed) == {'seed_0', 'seed_1'}
    for row in by_seed.values():
      first_token = row['first_token_attention']
      for kind in ('all', 'trigger', 'non_trigger'):
        assert np.shape(first_token[kind]) == (layers, heads)
      # The sink head is the head with the highest non-trigger first-token attention.
      non_trigger = np.asarray(first_token['non_trigger'])
      head = row['sink_head']
      assert head['non_trigger'] == non_trigger.max()
      assert non_trigger[head['layer'], head['head']] == non_trigger.max()
      assert head['trigger'] == first_token['trigger'][head['layer']][head['head']]
      # One curve point per checkpoint; the last is the final evaluation's sink head.
      assert [step for step, _ in row['curve']] == [2, 4]
      np.testing.assert_allclose(row['curve'][-1][1], head['non_trigger'], rtol=1e-5)
      crossed = [step for step, value in row['curve'] if value >= sink.SINK_THRESHOLD]
      assert row['sink_step'] == (crossed[0] if crossed else None)
    assert (by_seed['seed_0']['gate_score'] is None) == (name == 'none')
  # Seeds differ in initialisation, so their measurements differ.
  assert results['none']['seed_0']['loss'] != results['none']['seed_1']['loss']
  assert json.loads((tmp_path / 'results.json').read_text()) == results
  report = (tmp_path / 'report.md').read_text()
  assert report.count('| none |') == 2 and report.count('| g1_headwise |') == 2
  for figure in ('sink.png', 'attention_maps_seed_0.png', 'attention_maps_seed_1.png'):
    assert (tmp_path / figure).stat().st_size > 0

  # A rerun trains nothing again and measures nothing again.
  curve = tmp_path / 'seed_0' / 'runs' / 'none' / 'sink_curve.json'
  before = curve.stat().st_mtime_ns
  assert sink.run_sink_comparison(config, tmp_path, seeds=[0, 1]) == results
  assert curve.stat().st_mtime_ns == before


def test_a_sink_curve_is_measured_again_for_a_run_of_another_config(tmp_path, monkeypatch):
  measured = []
  monkeypatch.setattr(sink, 'first_token_attention_by_step', lambda run_dir, batches: (
      measured.append(run_dir) or {2: {'non_trigger': [[0.1, 0.4]]}}))
  for config, count in (({'train': {'steps': 2}}, 1), ({'train': {'steps': 2}}, 1),
                        ({'train': {'steps': 4}}, 2)):
    assert sink.sink_curve(tmp_path, config) == [[2, 0.4]]
    assert len(measured) == count


def test_command_refuses_bad_seeds_in_one_line(tmp_path):
  result = helpers.run([sys.executable, '-m', 'experiments.sink', '--config=configs/sink.py',
                        f'--workdir={tmp_path}', '--seeds=0,one'])
  assert result.returncode == 1
  assert result.stderr.strip().splitlines()[-1] == (
      "error: seeds='0,one': expected comma-separated ints.")
  assert not (tmp_path / 'seed_0').exists()
  result = helpers.run([sys.executable, '-m', 'experiments.sink', '--config=configs/sink.py',
                        f'--workdir={tmp_path}', '--seeds=0,-1'])
  assert result.returncode == 1 and 'seed 0' not in result.stdout  # Refused before seed 0 ran.
  assert 'train.seed' in result.stderr.strip().splitlines()[-1]
  assert not (tmp_path / 'seed_0').exists()
