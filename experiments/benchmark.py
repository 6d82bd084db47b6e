"""Train-step speed and memory, one row per combination of the axes given:

  python -m experiments.benchmark --config=configs/lm.py:size=small \
      --gates=none,g1_elementwise,g1_headwise --attention_impls=cpu_flash,chunked \
      [--scan=false,true] [--moe_impls=capacity,ragged] [--torch_python=.torch-venv/bin/python] \
      [--rounds=3] [--interleave=30] [--profile_steps=3] [--json]

Each row: parameters, ms/step (the median trial), tokens/s, MFU (gate FLOPs included), compiled
memory per device, and the overhead against the ungated row of the same settings. Rows run one
after the other, each alone in memory: timed round-robin in one process, a row's time depended
on the rows beside it (3-10% here). --torch_python runs the PyTorch reference
(../shared/bench/torch_lm.py, in its own environment) on the same shape, eager and with
torch.compile, right after the rows of its gate. --rounds repeats all of it in turns: a machine
whose speed drifts moves rows measured minutes apart, so each comparison is the median of the
ratios within a round. --interleave=N also measures each gated row against its ungated row step
by step: both compiled in one process, their steps taken in alternation, N pairs; the overhead
is the median of the pairs' ratios (column "interleaved"). --attention_memory=512,...,16384
prints the compiled memory of one attention layer's forward and backward pass per
implementation and length. --profile_steps=N traces N more steps of each row with jax.profiler
and prints where their time went: by category (matmul, attention, collective, data movement,
other fusions) and the costliest ops, each traced op joined to its instruction in the compiled
step (gated_attention.profiling).
"""

import itertools
import json
import pathlib
import re

import jax.numpy as jnp
from absl import flags

from experiments import cli, common
from gated_attention import aot, benchmark, profiling
from gated_attention import config as config_lib

_CONFIG = cli.define_config('configs/lm.py')
_GATES = flags.DEFINE_list('gates', ['none', 'g1_elementwise', 'g1_headwise'],
                           'Gate variants: names of gated_attention.config.GATE_PRESETS, each '
                           'optionally with model keys for its row (g1_silu+gate.mode=additive).')
_ATTENTION = flags.DEFINE_list('attention_impls', [], 'model.attention_impl values to compare '
                               '(default: the config\'s).')
_SCAN = flags.DEFINE_list('scan', [], 'model.scan_layers values to compare: false, true.')
_MOE = flags.DEFINE_list('moe_impls', [], 'model.moe.impl values to compare (MoE configs).')
_STEPS = flags.DEFINE_integer('steps', 10, 'Timed steps per trial.', lower_bound=1)
_TRIALS = flags.DEFINE_integer('trials', 3, 'Trials; the median trial is reported.',
                               lower_bound=1)
_ROUNDS = flags.DEFINE_integer('rounds', 1, 'Rounds: every row (each compiled afresh) and the '
                               'PyTorch reference, again, in turns; the median round is reported, '
                               'and comparisons are the median of the ratios within a round.',
                               lower_bound=1)
_INTERLEAVE = flags.DEFINE_integer(
    'interleave', 0, 'Pairs of steps: each gated row\'s step timed in alternation with its '
    'ungated row\'s, both in one process (and in memory); 0: not measured.', lower_bound=0)
_TORCH = flags.DEFINE_string('torch_python', None, 'Python of a PyTorch environment: also time '
                             'the PyTorch reference of the same shape (eager and compiled).')
_TORCH_SCRIPT = flags.DEFINE_string('torch_script', '../shared/bench/torch_lm.py',
                                    'The PyTorch reference script.')
_MEMORY = flags.DEFINE_list('attention_memory', [], 'Sequence lengths: print the compiled memory '
                            'of one attention layer per implementation instead of timing steps.')
_MEMORY_BATCH = flags.DEFINE_integer('memory_batch', 1, 'Sequences per device for '
                                     '--attention_memory.', lower_bound=1)
_TOPOLOGY = flags.DEFINE_string('topology', 'local', '--attention_memory: compile for this TPU '
                                'topology (e.g. v5p:2x2x1) or these NVIDIA GPUs (e.g. h200:1) '
                                'instead of one local device.')
_PROFILE_STEPS = flags.DEFINE_integer(
    'profile_steps', 0, 'Steps traced after each row\'s trials: where their time went, by '
    'category and op (0: no profile).', lower_bound=0)
_PROFILE_DIR = flags.DEFINE_string('profile_dir', '/tmp/gated_attention_profile',
                                   '--profile_steps: the traces go here, a folder per row.')
_JSON = flags.DEFINE_bool('json', False, 'Print JSON instead of a table.')

# The gates the PyTorch reference implements (G1 on the SDPA output).
_TORCH_GATES = ('none', 'g1_elementwise', 'g1_headwise')


def _parse_bool(text: str, key: str) -> bool:
  if text.lower() not in ('true', 'false'):
    raise config_lib.ConfigError(f'--{key}={text!r}: expected true or false.')
  return text.lower() == 'true'


def _rows(config) -> list[dict]:
  """One dict of axis values per combination; an empty axis keeps the config's value."""
  if _MOE.value and not config.model.moe.num_experts:
    raise config_lib.ConfigError(f'--moe_impls={",".join(_MOE.value)} compares MoE dispatch '
                                 'paths, and this model has no experts (model.moe.num_experts=0):'
                                 ' set --config.model.moe.num_experts, or give an MoE config.')
  values = {
      'gate': _GATES.value,
      'attention': _ATTENTION.value or [config.model.attention_impl],
      'scan': [_parse_bool(v, 'scan') for v in _SCAN.value] or [config.model.scan_layers],
      'moe': _MOE.value or [config.model.moe.impl],
  }
  return [dict(zip(values, combination)) for combination in itertools.product(*values.values())]


def _row_config(config, row: dict):
  run = config.copy_and_resolve_references()
  config_lib.set_variant(run.model, row['gate'], '--gates')
  run.model.attention_impl, run.model.scan_layers = row['attention'], row['scan']
  run.model.moe.impl = row['moe']
  config_lib.validate(run)
  return run


def _record(row: dict, round_index: int, result: dict) -> None:
  """Adds one round's result to a row (a JAX row or a PyTorch reference) and says it."""
  row.setdefault('rounds', []).append(result)
  label = ' '.join(f'{axis}={value}' for axis, value in row.items()
                   if axis not in ('rounds', 'result'))
  print(f'  round {round_index + 1}/{_ROUNDS.value} {label}: {result["step_time_s"] * 1e3:.1f} '
        f'ms/step', flush=True)
  if 'profile' in result and not _JSON.value:
    print(profiling.format_summary(result['profile']), flush=True)


def _profile_dir(row: dict, round_index: int) -> pathlib.Path:
  """A row's own folder for its trace, named after its settings and round."""
  label = '_'.join(str(row[axis]) for axis in ('gate', 'attention', 'scan', 'moe'))
  label = re.sub(r'[^\w.+=-]', '-', label)
  return pathlib.Path(_PROFILE_DIR.value) / f'{label}_round{round_index + 1}'


def _paired(row: dict, reference: dict) -> float:
  """row's step time over the reference's: the median of their ratios within a round."""
  times = [[result['step_time_s'] for result in each['rounds']] for each in (row, reference)]
  return benchmark.paired_ratio(*times)


def _ratio(value) -> str:
  return 'n/a' if value is None else f'{value:+.1%}'


def _print_table(config, rows: list[dict], torch: dict) -> None:
  first = rows[0]['result']
  print(f'\n{first["devices"]} x {first["device_kind"]}, batch {config.data.batch_size} x seq '
        f'{config.data.seq_len}, dtype {config.model.dtype}, {_ROUNDS.value} round(s) of '
        f'{_TRIALS.value} trial(s) of {_STEPS.value} step(s)')
  against = ' '.join(f'{"vs torch " + mode:>16}' for mode in ('eager', 'compile')) if torch else ''
  interleaved = f'{"interleaved":>24} ' if _INTERLEAVE.value else ''
  print(f'{"gate":28} {"attention":>10} {"scan":>5} {"moe":>9} {"params":>11} {"ms/step":>9} '
        f'{"range":>13} {"tokens/s":>9} {"mfu":>6} {"vs none":>8} {interleaved}'
        f'{"MiB/device":>10} {against}')
  for row in rows:
    r = row['result']
    mfu = f'{r["mfu"]:.1%}' if r['mfu'] is not None else 'n/a'
    memory = f'{r["memory_bytes"]["total"] / 2**20:.0f}' if r['memory_bytes'] else 'n/a'
    trials = [t for result in row['rounds'] for t in result['trial_step_times_s']]
    spread = f'{min(trials) * 1e3:.0f}-{max(trials) * 1e3:.0f}'
    versus = ' '.join(f'{_ratio(r[f"vs_torch_{mode}"]):>16}' for mode in ('eager', 'compile'))
    paired = r['interleaved_vs_none']
    paired = ('' if not _INTERLEAVE.value else f'{"":>24} ' if paired is None else
              f'{_ratio(paired["ratio"] - 1)} ({_ratio(paired["ratio_quartiles"][0] - 1)} to '
              f'{_ratio(paired["ratio_quartiles"][1] - 1)})'.rjust(24) + ' ')
    print(f'{row["gate"]:28} {row["attention"]:>10} {str(row["scan"]):>5} {row["moe"]:>9} '
          f'{r["params"]:>11,} {r["step_time_s"] * 1e3:>9.1f} {spread:>13} '
          f'{r["tokens_per_sec"]:>9,.0f} {mfu:>6} {_ratio(r["overhead_vs_none"]):>8} {paired}'
          f'{memory:>10} {versus if torch else ""}')
  for name, reference in torch.items():
    times = [result['step_time_s'] for result in reference['rounds']]
    spread = f'{min(times) * 1e3:.0f}-{max(times) * 1e3:.0f}' if len(times) > 1 else ''
    r = reference['result']
    print(f'{name:28} {"sdpa":>10} {"":>5} {"":>9} {r["params"]:>11,} '
          f'{r["step_time_s"] * 1e3:>9.1f} {spread:>13} {r["tokens_per_sec"]:>9,.0f}')
  print('(range: every trial of every round; PyTorch: its rounds. "vs" columns: the median over '
        'rounds of the ratio within a round. mfu: against the chip\'s dense bf16 peak, whatever '
        'the dtype.)')
  if _INTERLEAVE.value:
    print(f'(interleaved: against the ungated row, the median of {_INTERLEAVE.value} pairs of '
          'steps taken in alternation in one process, and the quartiles of those ratios)')
  if torch:
    print('(torch: PyTorch reference of the same shape, its own process, SDPA attention)')


def _attention_memory(config) -> dict | None:
  """Prints the compiled memory table, or returns it with --json."""
  impls = _ATTENTION.value or ['xla', 'dot_product', 'chunked']
  lengths = config_lib.parse_list(','.join(_MEMORY.value), '--attention_memory', int)
  benchmark.check_memory_measurable(impls, lengths)  # Before any compile.
  model, batch = config.model, _MEMORY_BATCH.value
  devices = aot.topology_devices(_TOPOLOGY.value)
  if _TOPOLOGY.value == 'local':
    devices = devices[:1]
  table = {impl: {length: benchmark.attention_memory(impl, length, model.num_heads,
                                                     model.head_dim, batch, jnp.dtype(model.dtype),
                                                     devices)
                  for length in lengths} for impl in impls}
  if _JSON.value:
    return table
  print(f'one attention layer, forward and backward, {batch} sequence(s) per device, '
        f'{model.num_heads} heads of {model.head_dim}, {model.dtype}, {len(devices)} x '
        f'{devices[0].device_kind}: compiled temporaries per device (MiB)')
  print(f'{"length":>8} ' + ' '.join(f'{impl:>12}' for impl in impls))
  for length in lengths:
    print(f'{length:>8} ' + ' '.join(
        f'{"> device":>12}' if table[impl][length] is None else
        f'{table[impl][length] / 2**20:>12.1f}' for impl in impls))


def _time_steps(config) -> dict:
  """Times every row (and the PyTorch reference), prints the table unless --json; returns
  {'rows', 'torch'}."""
  rows = _rows(config)
  row_configs = [_row_config(config, row) for row in rows]  # All refused before any compile.
  if _INTERLEAVE.value and 'none' not in _GATES.value:
    raise config_lib.ConfigError('--interleave measures each gated row against the ungated '
                                 'row of the same settings: add none to --gates.')
  if _TORCH.value:
    for flag, what in ((_TORCH, 'a Python interpreter'),
                       (_TORCH_SCRIPT, 'the PyTorch reference (outside the repository, in '
                                       '../shared/bench/ beside it)')):
      if not pathlib.Path(flag.value).is_file():
        raise config_lib.ConfigError(f'--{flag.name}={flag.value!r} is not a file; give {what}.')
    for row_config in row_configs:
      benchmark.check_torch_reference_shape(row_config)
  torch = {}
  for round_index in range(_ROUNDS.value):
    for gate in _GATES.value:  # Each gate's rows, then its PyTorch reference: close in time.
      for row, row_config in zip(rows, row_configs):
        if row['gate'] == gate:
          _record(row, round_index, benchmark.benchmark_train_step(
              row_config, _STEPS.value, _TRIALS.value, _PROFILE_STEPS.value,
              _profile_dir(row, round_index)))
      for mode in (('eager', 'compile') if _TORCH.value and gate in _TORCH_GATES else ()):
        reference = torch.setdefault(f'torch {mode} {gate}', {'reference': f'torch {mode}',
                                                               'gate': gate})
        _record(reference, round_index, benchmark.torch_reference(
            _TORCH.value, _TORCH_SCRIPT.value, _row_config(config, dict(rows[0], gate=gate)),
            compile_mode=mode == 'compile'))
  for row in [*rows, *torch.values()]:
    row['result'] = benchmark.lower_median(row['rounds'], key=lambda r: r['step_time_s'])
  for row, row_config in zip(rows, row_configs):  # Against the ungated row, and PyTorch.
    base = next((index for index, other in enumerate(rows) if other['gate'] == 'none' and all(
        other[axis] == row[axis] for axis in ('attention', 'scan', 'moe'))), None)
    row['result']['overhead_vs_none'] = None if base is None else _paired(row, rows[base]) - 1
    row['result']['interleaved_vs_none'] = None
    if _INTERLEAVE.value and base is not None and rows[base] is not row:
      print(f'  interleaved: {row["gate"]} against none, {_INTERLEAVE.value} pairs of steps',
            flush=True)
      row['result']['interleaved_vs_none'] = benchmark.interleaved_overhead(
          row_config, row_configs[base], _INTERLEAVE.value)
    for mode in ('eager', 'compile'):
      reference = torch.get(f'torch {mode} {row["gate"]}')
      row['result'][f'vs_torch_{mode}'] = _paired(row, reference) - 1 if reference else None
  if not _JSON.value:
    _print_table(config, rows, torch)
  return {'rows': rows, 'torch': torch}


def main(argv):
  del argv
  cli.refuse_gate_overrides(_CONFIG, '--gates')
  config = _CONFIG.value

  if _MEMORY.value:
    aot.compile_here(_TOPOLOGY.value)

  def run():
    with common.progress_to_stderr(_JSON.value):
      results = _attention_memory(config) if _MEMORY.value else _time_steps(config)
    if _JSON.value:
      print(json.dumps(results, indent=2))

  common.run_cleanly(run)


if __name__ == '__main__':
  cli.run(main, compilation_cache=False)  # It times compiling.
