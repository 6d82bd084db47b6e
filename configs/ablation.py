"""The paper's ablation (Tables 1 and 4, the rows that apply to a dense model) at CPU scale.

  python -m experiments.ablate --config=configs/ablation.py --workdir=runs/ablation

Arguments: size (tiny | small). Every variant trains on the same data with the same seed and
budget; then each is evaluated. `--config.variants=none,g1_elementwise` picks a subset,
`--config.learning_rates=2e-3,8e-3` sweeps the learning rate (the paper's stability result),
and `--config.train.*` / `--config.model.*` apply to every run.

Measured here: see the note at the end of this docstring and README.md.
"""

from gated_attention import config as config_lib

PAPER_ROWS = ('none', 'g1_elementwise', 'g1_headwise', 'g2_elementwise', 'g3_elementwise',
              'g4_elementwise', 'g5', 'g1_head_shared', 'g1_additive_silu', 'g1_ns_sigmoid',
              'g1_input_independent')


def get_config(arg: str = ''):
  args = config_lib.parse_arg(arg, size='tiny')
  config = config_lib.base_config(size=args.size, gate='none')
  config.train.update(steps=500, warmup_steps=50, log_every=10, checkpoint_every=250)
  config.variants = ','.join(PAPER_ROWS)
  config.learning_rates = ''  # Empty: train.learning_rate alone.
  return config
