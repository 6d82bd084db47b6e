"""Long-context evaluation of a checkpoint:

  python -m experiments.long_eval --workdir=DIR --lengths=256,512,1024,2048,4096 [--step=N]
      [--examples=8] [--tasks=passkey,multikey,variable_tracking]

Held-out loss by position bucket at each length, and retrieval accuracy (passkey, multikey,
variable tracking) by greedy generation; writes DIR/long_eval/step_N.json and PNGs beside it
(gated_attention/long_eval.py).
"""

from absl import flags

from experiments import cli, common
from gated_attention import config as config_lib
from gated_attention.long_eval import TASKS, long_eval

_WORKDIR = flags.DEFINE_string('workdir', None, 'Training run directory.', required=True)
_LENGTHS = flags.DEFINE_list('lengths', '256,512,1024,2048,4096', 'Context lengths in tokens.')
_STEP = flags.DEFINE_integer('step', None, 'Checkpoint step (default: the latest).',
                            lower_bound=0)
_EXAMPLES = flags.DEFINE_integer('examples', 8, 'Held-out windows and prompts per task and length.',
                                 lower_bound=1)
_TASKS = flags.DEFINE_list('tasks', ','.join(TASKS), 'Retrieval tasks.')
_MESH = flags.DEFINE_string('mesh', 'data=1,fsdp=-1,tensor=1,expert=1',
                            'Mesh for evaluation, independent of the one used in training.')


def main(argv):
  del argv
  def run():
    try:
      lengths = [int(length) for length in _LENGTHS.value]
    except ValueError:
      raise config_lib.ConfigError(f'--lengths={",".join(_LENGTHS.value)}: give integers, '
                                   'e.g. 256,512,1024.') from None
    mesh = common.parse_mesh(_MESH.value)
    return long_eval(_WORKDIR.value, lengths, _STEP.value, _EXAMPLES.value, mesh, _TASKS.value)

  common.run_cleanly(run)


if __name__ == '__main__':
  cli.run(main)
