"""Runs a command as N local processes of one jax.distributed job:

  python -m experiments.launch_local --num_processes=2 --devices_per_process=2 -- \\
      --config=configs/lm.py --workdir=runs/two_process --config.mesh.data=1 --config.mesh.fsdp=-1

Each process gets JAX_COORDINATOR_ADDRESS (a free port on 127.0.0.1), JAX_NUM_PROCESSES and
JAX_PROCESS_ID; its output is prefixed with its rank; if one fails the others are stopped.
"""

import sys

from absl import flags

from experiments import cli

from gated_attention.launch import launch_local

_NUM_PROCESSES = flags.DEFINE_integer('num_processes', 2, 'Processes to start.', lower_bound=1)
_DEVICES = flags.DEFINE_integer('devices_per_process', None,
                                'CPU devices per process (forces the CPU platform).',
                                lower_bound=1)
_MODULE = flags.DEFINE_string('module', 'experiments.train', 'Python module each process runs.')


def main(argv):
  sys.exit(launch_local(_MODULE.value, argv[1:], _NUM_PROCESSES.value, _DEVICES.value))


if __name__ == '__main__':
  cli.run(main)
