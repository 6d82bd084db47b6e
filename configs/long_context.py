"""A laptop-sized version of the paper's Table 5: extend a short-context model's window with YaRN
and compare the ungated baseline against the G1 gate beyond the training length.

  # 1. Train at 128 tokens (16 x 128 per step, 300 steps), for gate in none, g1_elementwise and
  #    seeds 0 and 1:
  python -m experiments.train --config=configs/long_context.py:gate=none,seed=0 \
      --workdir=/tmp/lc/none_s0_short
  # 2. Extend: YaRN factor 4 over the original 128 positions, continue 100 steps at 512 tokens
  #    (4 x 512 per step, the same tokens per step) from the short run's parameters:
  python -m experiments.train \
      --config=configs/long_context.py:gate=none,seed=0,stage=extend,source=/tmp/lc/none_s0_short \
      --workdir=/tmp/lc/none_s0_extend
  # 3. Evaluate both stages up to 16x the training length, then compare:
  python -m experiments.long_eval --workdir=/tmp/lc/none_s0_extend --lengths=128,256,512,1024,2048
  python -m experiments.long_context_table --runs=/tmp/lc

Expected (measured at cbceb34, mean of seeds 0 and 1): held-out loss at 2048 tokens 2.886
(none) and 2.852 (G1) before extension, 2.381 and 2.356 after it (seeds overlapping);
retrieval accuracy 0 everywhere (the tiny models do not copy). The sweep took 17 minutes on a
busy 2-core machine.

Arguments: gate (a GATE_PRESETS name), seed, stage (short | extend), source (the short run's
workdir, for stage=extend). The README section "Long context" reports the measured comparison.
"""

from gated_attention import config as config_lib

SHORT_LENGTH = 128
EXTEND_FACTOR = 4


def get_config(arg: str = ''):
  args = config_lib.parse_arg(arg, gate='g1_elementwise', seed=0, stage='short', source='')
  if args.stage not in ('short', 'extend'):
    raise config_lib.ConfigError(f"Config argument stage={args.stage!r}: choose 'short' or "
                                 "'extend'.")
  if (args.stage == 'extend') != bool(args.source):
    raise config_lib.ConfigError('Config argument source=DIR (the short run) goes with '
                                 'stage=extend, and only there.')
  config = config_lib.base_config(size='tiny', gate=args.gate)
  config.train.seed = args.seed
  config.data.seq_len = SHORT_LENGTH
  if args.stage == 'extend':
    config.data.update(seq_len=SHORT_LENGTH * EXTEND_FACTOR, batch_size=16 // EXTEND_FACTOR)
    config.eval.batch_size = 4
    config.model.rope_scaling.update(type='yarn', factor=float(EXTEND_FACTOR),
                                     original_max_position=SHORT_LENGTH)
    config.train.update(steps=100, warmup_steps=10, learning_rate=1e-3, min_learning_rate=1e-4,
                        checkpoint_every=100, init_from=args.source)
  return config
