"""The attention sink in minutes: a small model on the Bigram-Backcopy task
(gated_attention/bigram_backcopy.py; Guo et al. 2024, arXiv 2410.13835), and the gates.

  python -m experiments.sink --config=configs/sink.py --workdir=runs/sink --seeds=0,1
  python -m experiments.train --config=configs/sink.py:gate=none,seed=0 --workdir=/tmp/sink_none

Arguments: gate (any name in gated_attention.config.GATE_PRESETS; the single run of
experiments.train), seed. experiments.sink trains every name in `variants`, with each seed.

Measured with the command above at cbceb34 (seeds 0 / 1; 18 minutes on a busy 2-core machine):
first-token attention of non-trigger queries in the most sink-like head, baseline 0.66 / 0.79
(trigger queries 0.00: an active-dormant head; past 0.3 by step 125 / 75; M-Act 135 / 170);
G2 0.04 / 0.02 (never past 0.3), G1 elementwise 0.23 / 0.06 (seed 1 past 0.3 once, at step
50); G1 headwise 0.36 / 0.10, head-shared 0.20 / 0.03, NS-sigmoid 0.15 / 0.32 (reduced);
input-independent 0.38 / 0.95 (kept). Held-out loss: baseline 1.238 / 1.253, gates 1.216-1.232.

Recipe, chosen by measuring (one layer, d_model 128, 4 heads of 32, MLP 512, batch 16 x 256,
BB with the 3 most frequent bytes of the embedded corpus as triggers; numbers are the baseline's
first-token attention from non-trigger queries in its most sink-like head, on 32 held-out
sequences, per seed): no QK-norm, RoPE on a quarter of each head, LR 1e-2 after 100 warmup steps
(cosine to 1e-3), no weight decay, 200 steps (about 1.5 minutes of training on one core).

  the trainer's defaults (QK-norm, full RoPE, LR 3e-3, warmup 30, weight decay 0.1), seed 3:
    0.49 at step 400, 0.52 at step 600; init_std 0.1, 400 steps, seeds 0 / 2: 0.15 / 0.15;
  one change at a time from those, 400 steps, seeds 0 / 2: LR 1e-2: 0.60 / 0.05; LR 1e-3: – /
    0.13; one trigger: 0.55 / 0.16; rope_fraction 0.25: 0.18 / 0.32; 2 heads of 64: – / 0.23;
    8 heads of 16: – / 0.31; 2 layers: – / 0.53; no QK-norm, 1 head of 128: 0.05 / 0.17; untied
    embeddings, no QK-norm: 0.06 / 0.16, the same with 1 head: 0.15 / 0.37;
  300 steps, seed 2: LR 1e-2, warmup 100, no weight decay: 0.13; the same without QK-norm and
    with rope_fraction 0.25: 0.87 (0.89 by step 100): the recipe; untied embeddings, no QK-norm,
    no weight decay, LR 3e-3, batch 32 x 128: 0.21;
  the recipe, shorter, seeds 0 / 1: 150 steps, warmup 50: 0.53 / 0.68 (G1 elementwise, seed 0:
    0.37 at step 25, then 0.01 from step 75 on); 150 steps, warmup 50, LR 2e-2: 0.56 / 0.54;
    seq_len 128, 200 steps, warmup 60: 0.29 / 0.76; 200 steps, warmup 100 (shipped), seed 0:
    0.62.
"""

from gated_attention import config as config_lib

# The baseline, the paper's gates (G1 elementwise and headwise) and the contrasts it and Guo et
# al. discuss: one gate shared by the heads, a gate that ignores its input, NS-sigmoid, G2.
VARIANTS = ('none', 'g1_elementwise', 'g1_headwise', 'g1_head_shared', 'g1_input_independent',
            'g1_ns_sigmoid', 'g2_elementwise')


def get_config(arg: str = ''):
  args = config_lib.parse_arg(arg, gate='none', seed=0)
  config = config_lib.base_config(size='tiny', gate=args.gate)
  # No QK-norm and RoPE on a quarter of each head: a query can then find BOS by its content
  # alone, at any distance, with logits as large as it needs.
  config.model.update(d_model=128, num_layers=1, num_heads=4, num_kv_heads=4, head_dim=32,
                      mlp_dim=512, qk_norm=False, rope_fraction=0.25)
  config.data.update(source='bigram_backcopy', seq_len=256, batch_size=16)
  config.train.update(seed=args.seed, steps=200, warmup_steps=100, learning_rate=1e-2,
                      min_learning_rate=1e-3, weight_decay=0.0, log_every=25,
                      checkpoint_every=25,
                      keep_checkpoints=100)  # Every checkpoint stays: the sink's curve reads them.
  config.eval.update(batch_size=16, batches=4, analysis_batches=2)
  config.variants = ','.join(VARIANTS)
  config.learning_rates = ''  # Empty: train.learning_rate alone.
  return config
