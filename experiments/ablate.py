"""Regenerates the paper's ablation table:

  python -m experiments.ablate --config=configs/ablation.py --workdir=runs/ablation

Writes WORKDIR/report.md, WORKDIR/results.json and PNGs; rerunning resumes the sweep.
"""

from absl import flags

from experiments import cli, common
from gated_attention.ablation import run_ablation

_CONFIG = cli.define_config('configs/ablation.py', 'Ablation config.')
_WORKDIR = flags.DEFINE_string('workdir', None, 'Sweep directory.', required=True)


def main(argv):
  del argv
  cli.refuse_gate_overrides(_CONFIG, '--config.variants')
  common.run_cleanly(lambda: run_ablation(_CONFIG.value, _WORKDIR.value))


if __name__ == '__main__':
  cli.run(main)
