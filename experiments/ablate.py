"""Regenerates the paper's ablation table:

  python -m experiments.ablate --config=configs/ablation.py --workdir=runs/ablation

Writes WORKDIR/report.md, WORKDIR/results.json and PNGs; rerunning resumes the sweep.
"""

from absl import app, flags
from ml_collections import config_flags

from experiments import common
from gated_attention.ablation import run_ablation

_CONFIG = config_flags.DEFINE_config_file('config', 'configs/ablation.py', 'Ablation config.')
_WORKDIR = flags.DEFINE_string('workdir', None, 'Sweep directory.', required=True)


def main(argv):
  del argv
  common.run_cleanly(lambda: run_ablation(_CONFIG.value, _WORKDIR.value))


if __name__ == '__main__':
  app.run(main)
