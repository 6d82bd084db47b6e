"""The attention sink and the gate that removes it, on the Bigram-Backcopy task:

  python -m experiments.sink --config=configs/sink.py --workdir=runs/sink --seeds=0,1

Trains every variant of the config (the baseline and the gates) on the same data, once per seed;
writes WORKDIR/report.md, WORKDIR/results.json and PNGs (see gated_attention/sink.py).
Rerunning resumes.
"""

from absl import flags

from experiments import cli, common
from gated_attention.config import parse_list
from gated_attention.sink import run_sink_comparison

_CONFIG = cli.define_config('configs/sink.py', 'Sink comparison config.')
_WORKDIR = flags.DEFINE_string('workdir', None, 'Comparison directory.', required=True)
_SEEDS = flags.DEFINE_string('seeds', '0,1', 'Comma-separated train.seed values.')


def main(argv):
  del argv
  cli.refuse_gate_overrides(_CONFIG, '--config.variants')
  common.run_cleanly(lambda: run_sink_comparison(
      _CONFIG.value, _WORKDIR.value, parse_list(_SEEDS.value, 'seeds', int)))


if __name__ == '__main__':
  cli.run(main)
