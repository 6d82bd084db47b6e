"""Train-step speed per gate variant, and the gate's overhead against the baseline:

  python -m experiments.benchmark --config=configs/lm.py:size=small --gates=none,g1_elementwise
"""

import json

from absl import flags

from experiments import cli, common
from gated_attention import config as config_lib
from gated_attention.benchmark import benchmark_train_step

_CONFIG = cli.define_config('configs/lm.py')
_GATES = flags.DEFINE_list('gates', ['none', 'g1_elementwise', 'g1_headwise'],
                           'Gate variants (names of gated_attention.config.GATE_PRESETS).')
_STEPS = flags.DEFINE_integer('steps', 10, 'Timed steps per trial.', lower_bound=1)
_TRIALS = flags.DEFINE_integer('trials', 3, 'Trials; the median step time is reported.',
                              lower_bound=1)
_JSON = flags.DEFINE_bool('json', False, 'Print JSON instead of a table.')


def main(argv):
  del argv

  def run():
    results = {}
    for gate in _GATES.value:
      config = _CONFIG.value.copy_and_resolve_references()
      config.model.gate = config_lib.gate_config(gate)
      results[gate] = benchmark_train_step(config, _STEPS.value, _TRIALS.value)
      print(f'  {gate}: {results[gate]["step_time_s"] * 1e3:.1f} ms/step', flush=True)
    baseline = results.get('none')
    for result in results.values():
      result['overhead_vs_none'] = (result['step_time_s'] / baseline['step_time_s'] - 1
                                    if baseline else None)
    if _JSON.value:
      print(json.dumps(results, indent=2))
      return
    first = next(iter(results.values()))
    print(f'\n{first["devices"]} x {first["device_kind"]}, batch {_CONFIG.value.data.batch_size}'
          f' x seq {_CONFIG.value.data.seq_len}, dtype {_CONFIG.value.model.dtype}')
    print(f'{"gate":24} {"params":>12} {"ms/step":>9} {"tokens/s":>10} {"mfu":>6} '
          f'{"vs none":>8} {"MiB/device":>11}')
    for gate, r in results.items():
      mfu = f'{r["mfu"]:.1%}' if r['mfu'] is not None else 'n/a'
      overhead = f'{r["overhead_vs_none"]:+.1%}' if r['overhead_vs_none'] is not None else 'n/a'
      memory = f'{r["memory_bytes"]["total"] / 2**20:.0f}' if r['memory_bytes'] else 'n/a'
      print(f'{gate:24} {r["params"]:>12,} {r["step_time_s"] * 1e3:>9.1f} '
            f'{r["tokens_per_sec"]:>10,.0f} {mfu:>6} {overhead:>8} {memory:>11}')

  common.run_cleanly(run)


if __name__ == '__main__':
  cli.run(main)
