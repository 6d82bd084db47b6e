"""The benchmark's results (arithmetic over its trials) and its PyTorch reference's contract."""

import json
import re
import sys

import pytest

from gated_attention import benchmark
from gated_attention.config import ConfigError
from tests import helpers
from tests.helpers import run_config


def test_benchmark_train_step_reports_the_median_trial():
  configs = [run_config(gate='none'), run_config(gate='g1_headwise')]
  for config in configs:
    config.model.num_layers = 1
  results = [benchmark.benchmark_train_step(config, steps=1, trials=trials)
             for config, trials in zip(configs, (3, 4))]
  model = configs[0].model
  # The headwise gate adds one [d_model, num_heads] kernel per layer.
  assert results[1]['params'] - results[0]['params'] == model.d_model * model.num_heads
  tokens_per_step = configs[0].data.batch_size * configs[0].data.seq_len
  for result, trials in zip(results, (3, 4)):
    times, median = result['trial_step_times_s'], result['step_time_s']
    assert len(times) == trials and min(times) > 0
    # A measured trial (with 4, not the mean of the middle two) with at most half on each side.
    assert median in times
    assert sum(t < median for t in times) <= trials // 2 >= sum(t > median for t in times)
    assert result['tokens_per_sec'] == pytest.approx(tokens_per_step / result['step_time_s'])
    assert result['memory_bytes']['total'] > 0 and result['devices'] == 1


@pytest.fixture
def fake_python(tmp_path):
  """An executable standing in for a PyTorch interpreter: records its environment, prints the
  reference's result line (or fails, with FAIL=1 in its own environment)."""
  script = tmp_path / 'python'
  script.write_text('#!/bin/sh\n'
                    f'env > {tmp_path}/env.txt\n'
                    'if [ -n "$FAIL" ]; then echo "no torch here" >&2; exit 3; fi\n'
                    'echo "torch 2 compile=$COMPILE gate=$GATE params=1,234 ms/step=250.0 '
                    'tokens/s=1"\n')
  script.chmod(0o755)
  return script


def test_torch_reference_gets_the_shape_and_reads_its_line(fake_python, tmp_path):
  config = run_config(gate='g1_headwise')
  result = benchmark.torch_reference(str(fake_python), 'torch_lm.py', config, compile_mode=True)
  environment = dict(line.split('=', 1) for line in
                     (tmp_path / 'env.txt').read_text().splitlines() if '=' in line)
  model = config.model
  assert {key: environment[key] for key in ('D', 'LAYERS', 'HEADS', 'KV_HEADS', 'HEAD_DIM',
                                            'SEQ', 'BATCH', 'GATE', 'COMPILE')} == {
      'D': '32', 'LAYERS': '2', 'HEADS': '4', 'KV_HEADS': '2', 'HEAD_DIM': '8',
      'SEQ': '32', 'BATCH': '8', 'GATE': 'headwise', 'COMPILE': '1'}
  assert environment['MLP'] == str(model.mlp_dim)
  assert result['params'] == 1234 and result['step_time_s'] == 0.25
  assert result['tokens_per_sec'] == 8 * 32 / 0.25
  narrowed = run_config(gate='g1_elementwise')  # The gate's 1,024 parameters a layer:
  narrowed.model.match_baseline_params = True  # 64 - 1024 / 96 = 53.3, a multiple of 16: 48.
  benchmark.torch_reference(str(fake_python), 'torch_lm.py', narrowed)
  assert 'MLP=48\n' in (tmp_path / 'env.txt').read_text()


def test_torch_reference_refuses_a_shape_it_cannot_take(fake_python):
  config = run_config(gate='g1_elementwise')
  config.model.update(vocab_size=4096, dtype='bfloat16')
  with pytest.raises(ConfigError, match=r"model.vocab_size=4096 \(the reference: 384\), "
                                        r"model.dtype='bfloat16' \(the reference: 'float32'\)"):
    benchmark.torch_reference(str(fake_python), 'torch_lm.py', config)


def test_torch_reference_failure_names_the_script_and_its_error(fake_python, tmp_path):
  failing = tmp_path / 'failing_python'
  failing.write_text(f'#!/bin/sh\nFAIL=1 exec {fake_python} "$@"\n')
  failing.chmod(0o755)
  with pytest.raises(ConfigError, match=r'torch_lm\.py failed under .*failing_python \(exit '
                                        r'status 3\): no torch here$'):
    benchmark.torch_reference(str(failing), 'torch_lm.py', run_config(gate='none'))


@pytest.mark.parametrize('impls, lengths, message', [
    (['xla', 'cpu_flash'], [512], 'cpu_flash keeps its working memory inside the kernel'),
    (['xla', 'flash'], [512], r"--attention_impls: flash is not an implementation; choose from "
                              r"\['xla', 'dot_product', 'cudnn', 'chunked', 'splash', 'cpu_flash'\]"),
    (['auto'], [512], 'auto is not an implementation'),
    (['xla'], [512, 0], '--attention_memory: 0 is not a length'),
    (['xla', 'splash'], [512, 100], r'splash runs in blocks of 128 tokens, and 100 is not a '
                                    r'multiple \(chunked would run in its place\)'),
])
def test_attention_memory_refuses_what_it_cannot_measure_as_named(impls, lengths, message):
  with pytest.raises(ConfigError, match=message):
    benchmark.check_memory_measurable(impls, lengths)


def test_attention_memory_of_one_implementation_is_refused_likewise():
  with pytest.raises(ConfigError, match='cpu_flash keeps its working memory inside the kernel'):
    benchmark.attention_memory('cpu_flash', 512)
  benchmark.check_memory_measurable(['xla', 'dot_product', 'chunked', 'splash'], [128, 512])


def test_rounds_compare_each_row_with_the_reference_timed_in_the_same_round(tmp_path):
  """Two rounds against a PyTorch stand-in that slows down each call (100, 200, 300, 400 ms:
  eager and compiled, round 1 then round 2): a comparison is the lower median of the ratios
  within a round, never one round's time against another's."""
  counting = tmp_path / 'python'
  counting.write_text(f'#!/bin/sh\nn=$(($(cat {tmp_path}/calls 2>/dev/null || echo 0) + 1))\n'
                      f'echo $n > {tmp_path}/calls\n'
                      'echo "torch 2 compile=$COMPILE gate=$GATE params=1 ms/step=${n}00.0"\n')
  counting.chmod(0o755)
  script = tmp_path / 'torch_lm.py'
  script.write_text('')
  flags = {**helpers.TINY_FLAGS, 'model.num_layers': 1}
  result = helpers.run([sys.executable, '-m', 'experiments.benchmark', '--config=configs/lm.py',
                        *[f'--config.{key}={value}' for key, value in flags.items()],
                        '--gates=none', '--steps=1', '--trials=1', '--rounds=2', '--json',
                        f'--torch_python={counting}', f'--torch_script={script}'])
  assert result.returncode == 0, result.stderr[-3000:]
  report = json.loads(result.stdout)
  (row,) = report['rows']
  jax_times = [r['step_time_s'] for r in row['rounds']]
  assert len(jax_times) == 2 and row['result']['step_time_s'] == min(jax_times)
  torch = report['torch']
  assert [r['step_time_s'] for r in torch['torch eager none']['rounds']] == [0.1, 0.3]
  assert [r['step_time_s'] for r in torch['torch compile none']['rounds']] == [0.2, 0.4]
  assert torch['torch compile none']['result']['step_time_s'] == 0.2
  assert row['result']['vs_torch_eager'] == pytest.approx(
      min(jax_times[0] / 0.1, jax_times[1] / 0.3) - 1)
  assert row['result']['vs_torch_compile'] == pytest.approx(
      min(jax_times[0] / 0.2, jax_times[1] / 0.4) - 1)
  assert row['result']['overhead_vs_none'] == 0


def test_interleaved_ratios_alternate_which_step_goes_first():
  """A step of 1.0 s against a reference of 1.25 s on a clock only the steps advance: every
  ratio is 0.8, and the first of each pair takes turns."""
  now, calls = [0.0], []

  def step_of(name, seconds):
    def run():
      calls.append(name)
      now[0] += seconds
    return run

  ratios = benchmark.interleaved_ratios(step_of('step', 1.0), step_of('reference', 1.25), 3,
                                        clock=lambda: now[0])
  assert ratios == [pytest.approx(0.8)] * 3
  assert calls == ['step', 'reference', 'reference', 'step', 'step', 'reference']


def test_interleave_measures_each_gated_row_against_its_ungated_row(tmp_path):
  flags = {**helpers.TINY_FLAGS, 'model.num_layers': 1}
  result = helpers.run([sys.executable, '-m', 'experiments.benchmark', '--config=configs/lm.py',
                        *[f'--config.{key}={value}' for key, value in flags.items()],
                        '--gates=none,g1_headwise', '--steps=1', '--trials=1', '--interleave=3',
                        '--json'])
  assert result.returncode == 0, result.stderr[-3000:]
  rows = json.loads(result.stdout)['rows']
  assert [row['gate'] for row in rows] == ['none', 'g1_headwise']
  assert rows[0]['result']['interleaved_vs_none'] is None  # Not against itself.
  paired = rows[1]['result']['interleaved_vs_none']
  low, high = paired['ratio_quartiles']
  assert paired['pairs'] == 3 and 0 < low <= paired['ratio'] <= high


@pytest.mark.parametrize('flags, message', [
    (['--gates=g1_headwise', '--interleave=3'], 'error: --interleave measures each gated row '
                                                'against the ungated row .* add none to --gates'),
    (['--moe_impls=ragged'], r'error: --moe_impls=ragged compares MoE dispatch paths, and this '
                             r'model has no experts \(model.moe.num_experts=0\)'),
])
def test_a_comparison_it_cannot_make_is_refused_before_compiling(flags, message):
  result = helpers.run([sys.executable, '-m', 'experiments.benchmark', '--config=configs/lm.py',
                        *flags])
  assert result.returncode == 1 and re.search(message, result.stderr), result.stderr[-2000:]
  assert 'round 1/1' not in result.stdout + result.stderr  # No row was timed.


@helpers.needs_cuda_plugin
def test_attention_memory_compiles_for_a_gpu_this_host_does_not_have():
  """One attention layer of 4 sequences x 2,048 tokens, 4 heads, for an H200: `xla` keeps
  float32 [4, 4, L, L] arrays (scores, probabilities, their gradients), cuDNN's kernel and
  `chunked` none."""
  result = helpers.run([sys.executable, '-m', 'experiments.benchmark', '--config=configs/lm.py',
                        '--config.model.dtype=bfloat16', '--topology=h200:1', '--memory_batch=4',
                        '--attention_memory=2048,65536', '--attention_impls=xla,chunked,cudnn',
                        '--json'], path=[helpers.GPU_AOT])
  assert result.returncode == 0, result.stderr[-3000:]
  table = json.loads(result.stdout)
  memory = {impl: sizes['2048'] for impl, sizes in table.items()}
  scores = 4 * 4 * 2048 * 2048 * 4  # One float32 [4, 4, L, L] array: 256 MiB.
  assert memory['xla'] >= 2 * scores and scores > 8 * max(memory['cudnn'], memory['chunked'])
  # At 65,536 tokens one such array is 256 GiB, more than the H200's 140 GiB.
  assert table['xla']['65536'] is None and table['cudnn']['65536'] < 2**30
