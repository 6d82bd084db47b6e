"""Evaluates a checkpoint: python -m experiments.eval --workdir=DIR [--step=N]

Writes DIR/eval/step_<N>.json (held-out loss, perplexity, first_token_attention, max_activation,
gate_score) and PNG figures beside it.
"""

from absl import flags

from experiments import cli, common
from gated_attention.evaluate import evaluate

_WORKDIR = flags.DEFINE_string('workdir', None, 'Training run directory.', required=True)
_STEP = flags.DEFINE_integer('step', None, 'Checkpoint step (default: the latest).',
                            lower_bound=0)
_BATCHES = flags.DEFINE_integer('batches', None, 'Held-out batches (default: eval.batches).',
                               lower_bound=1)
_MESH = flags.DEFINE_string('mesh', 'data=1,fsdp=-1,tensor=1,expert=1',
                            'Mesh for evaluation, independent of the one used in training.')


def main(argv):
  del argv
  def run():
    mesh = common.parse_mesh(_MESH.value)
    return evaluate(_WORKDIR.value, _STEP.value, mesh, _BATCHES.value)

  common.run_cleanly(run)


if __name__ == '__main__':
  cli.run(main)
