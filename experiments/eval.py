"""Evaluates a checkpoint: python -m experiments.eval --workdir=DIR [--step=N]

Writes DIR/eval/step_<N>.json (held-out loss, perplexity, first_token_attention, max_activation,
gate_score) and PNG figures beside it.
"""

from absl import app, flags

from experiments import common
from gated_attention import config as config_lib
from gated_attention.evaluate import evaluate

_WORKDIR = flags.DEFINE_string('workdir', None, 'Training run directory.', required=True)
_STEP = flags.DEFINE_integer('step', None, 'Checkpoint step (default: the latest).')
_BATCHES = flags.DEFINE_integer('batches', None, 'Held-out batches (default: eval.batches).')
_MESH = flags.DEFINE_string('mesh', 'data=1,fsdp=-1,tensor=1,expert=1',
                            'Mesh for evaluation, independent of the one used in training.')


def main(argv):
  del argv
  mesh = config_lib.parse_arg(_MESH.value, data=1, fsdp=-1, tensor=1, expert=1)
  common.run_cleanly(lambda: evaluate(_WORKDIR.value, _STEP.value, mesh, _BATCHES.value))


if __name__ == '__main__':
  app.run(main)
