"""Parameters and FLOPs of a config without allocating it:

  python -m experiments.summary --config=configs/paper.py:model=moe_15a2b,gate=g1_elementwise [--json]
"""

import json

from absl import flags

from experiments import cli, common
from gated_attention.summary import format_summary, summarize

_CONFIG = cli.define_config('configs/lm.py')
_JSON = flags.DEFINE_bool('json', False, 'Print JSON.')


def main(argv):
  del argv
  summary = common.run_cleanly(lambda: summarize(_CONFIG.value))
  print(json.dumps(summary, indent=2) if _JSON.value else format_summary(summary))


if __name__ == '__main__':
  cli.run(main)
