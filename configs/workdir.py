"""The config saved in a workdir, for continuing its run (an imported model, say):

  python -m experiments.train --config=configs/workdir.py:workdir=runs/qwen3 --workdir=runs/qwen3 \
      --config.train.steps=200 --config.train.learning_rate=1e-4 --config.train.min_learning_rate=1e-5

Every key can be overridden as usual; the model keys must stay as saved.
"""

from gated_attention import checkpoint as checkpoint_lib
from gated_attention import config as config_lib


def get_config(arg: str = ''):
  args = config_lib.parse_arg(arg, workdir='')
  if not args.workdir:
    raise config_lib.ConfigError('configs/workdir.py needs the workdir: '
                                 '--config=configs/workdir.py:workdir=DIR.')
  return checkpoint_lib.load_config(args.workdir)
