"""A decoder LM with gated attention on the embedded corpus (the Python standard library's
sources, byte-level).

  python -m experiments.train --config=configs/lm.py:size=tiny,gate=g1_elementwise --workdir=/tmp/lm
  python -m experiments.eval --workdir=/tmp/lm

Arguments: size (tiny | small), gate (any name in gated_attention.config.GATE_PRESETS: none,
g1_elementwise, g1_headwise, g2_elementwise, g5, g1_head_shared, g1_ns_sigmoid, ...). Every other
gate axis is a flag: --config.model.gate.activation=silu, --config.model.gate.position=g3, ...

Expected (2-core CPU, tiny, g1_elementwise, 300 steps of 16 x 128 tokens, measured): about 40 s
of training at 20k tokens/s; held-out loss 2.151 (perplexity 8.60), first-token attention
0.024, mean of per-layer max activation 1.7, mean gate score 0.461. size=small (256 wide, 16 x 256
tokens per step) runs at about 0.8 s per step.
"""

from gated_attention import config as config_lib


def get_config(arg: str = ''):
  args = config_lib.parse_arg(arg, size='tiny', gate='g1_elementwise')
  return config_lib.base_config(size=args.size, gate=args.gate)
