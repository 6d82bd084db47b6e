"""The attention sink in minutes: a small model on the Bigram-Backcopy task
(gated_attention/bigram_backcopy.py; Guo et al. 2024, arXiv 2410.13835), and the gates.

  python -m experiments.sink --config=configs/sink.py --workdir=runs/sink --seeds=0,1
  python -m experiments.train --config=configs/sink.py:gate=none,seed=0 --workdir=/tmp/sink_none

Arguments: gate (any name in gated_attention.config.GATE_PRESETS; the single run of
experiments.train), seed. experiments.sink trains every name in `variants`, with each seed.

Recipe: TO BE TUNED.
"""

from gated_attention import config as config_lib

# The baseline, the paper's gates (G1 elementwise and headwise) and the contrasts it and Guo et
# al. discuss: one gate shared by the heads, a gate that ignores its input, NS-sigmoid, G2.
VARIANTS = ('none', 'g1_elementwise', 'g1_headwise', 'g1_head_shared', 'g1_input_independent',
            'g1_ns_sigmoid', 'g2_elementwise')


def get_config(arg: str = ''):
  args = config_lib.parse_arg(arg, gate='none', seed=0)
  config = config_lib.base_config(size='tiny', gate=args.gate)
  config.model.update(d_model=128, num_layers=1, num_heads=4, num_kv_heads=4, head_dim=32,
                      mlp_dim=512)
  config.data.update(source='bigram_backcopy', seq_len=256, batch_size=16)
  config.train.update(seed=args.seed, steps=300, warmup_steps=30, learning_rate=3e-3,
                      min_learning_rate=3e-4, log_every=25, checkpoint_every=50,
                      keep_checkpoints=100)  # Every checkpoint stays: the sink's curve reads them.
  config.eval.update(batch_size=16, batches=4, analysis_batches=2)
  config.variants = ','.join(VARIANTS)
  config.learning_rates = ''  # Empty: train.learning_rate alone.
  return config
