"""Trains a model: python -m experiments.train --config=configs/lm.py:size=tiny --workdir=DIR

Restarting the same command resumes from the latest complete checkpoint in DIR.
"""

from absl import app, flags
from ml_collections import config_flags

from experiments import common
from gated_attention.train import train

_CONFIG = config_flags.DEFINE_config_file('config', 'configs/lm.py', 'Experiment config file.')
_WORKDIR = flags.DEFINE_string('workdir', None, 'Run directory: checkpoints, metrics, eval.',
                               required=True)


def main(argv):
  del argv
  common.run_cleanly(lambda: train(_CONFIG.value, _WORKDIR.value))


if __name__ == '__main__':
  app.run(main)
