"""Trains a model: python -m experiments.train --config=configs/lm.py:size=tiny --workdir=DIR

Restarting the same command resumes from the latest complete checkpoint in DIR; a changed model
is refused, and so is a changed data order unless --allow_data_change says it is intended.
"""

from absl import flags

from experiments import cli, common
from gated_attention.train import train

_CONFIG = cli.define_config('configs/lm.py')
_WORKDIR = flags.DEFINE_string('workdir', None, 'Run directory: checkpoints, metrics, eval.',
                               required=True)
_ALLOW_DATA_CHANGE = flags.DEFINE_bool(
    'allow_data_change', False, 'On resume, accept changed data.* keys or train.seed: the run '
    'continues as many examples into the new data order as it had consumed.')


def main(argv):
  del argv
  common.run_cleanly(lambda: train(_CONFIG.value, _WORKDIR.value, _ALLOW_DATA_CHANGE.value))


if __name__ == '__main__':
  cli.run(main)
