"""Parameters and FLOPs of a config without allocating it:

  python -m experiments.summary --config=configs/paper.py:model=moe_15a2b,gate=g1_elementwise [--json]
"""

import json

from absl import app, flags
from ml_collections import config_flags

from experiments import common
from gated_attention.summary import format_summary, summarize

_CONFIG = config_flags.DEFINE_config_file('config', 'configs/lm.py', 'Experiment config file.')
_JSON = flags.DEFINE_bool('json', False, 'Print JSON.')


def main(argv):
  del argv
  summary = common.run_cleanly(lambda: summarize(_CONFIG.value))
  print(json.dumps(summary, indent=2) if _JSON.value else format_summary(summary))


if __name__ == '__main__':
  app.run(main)
