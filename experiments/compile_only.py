"""Compiles the train and eval steps for a TPU slice or NVIDIA GPUs you do not have, and checks
they fit:

  python -m experiments.compile_only --config=configs/paper.py:model=dense_1p7b_28l \
      --topology=v5p:4x4x4 [--num_slices=N] [--traffic=N] [--json]

--topology=h200:8 (h100:4x8 for 4 hosts of 8, FILE.txtpb:8 for other GPUs) compiles for NVIDIA
GPUs; --topology=local for the devices at hand. Needs the TPU runtime for TPU topologies (pip
install -r requirements-tpu.txt), jax's CUDA plugin for GPUs (requirements-gpu-aot.txt).
--traffic=N adds the bytes each op of the train step moves (gated_attention.traffic). Exits 1
when the train or the eval step does not fit in a device's memory (a chip's; on a CPU, the
host's share per device), naming the step.
"""

import json
import sys

from absl import flags

from experiments import cli, common
from gated_attention import aot

_CONFIG = cli.define_config('configs/lm.py')
_TOPOLOGY = flags.DEFINE_string('topology', 'local', "A TPU topology such as 'v5p:4x4x4', NVIDIA "
                                "GPUs such as 'h200:8', or 'local' for the devices at hand.")
_NUM_SLICES = flags.DEFINE_integer('num_slices', 1, 'Slices of that topology (multi-slice).',
                                  lower_bound=1)
_TRAFFIC = flags.DEFINE_integer('traffic', 0, 'Also count the bytes each op of the train step '
                                'reads and writes, and list the N that move most.', lower_bound=0)
_JSON = flags.DEFINE_bool('json', False, 'Print JSON.')


def main(argv):
  del argv
  aot.compile_here(_TOPOLOGY.value)

  def run():
    devices = aot.topology_devices(_TOPOLOGY.value, _NUM_SLICES.value)
    with common.progress_to_stderr(_JSON.value):
      report = aot.compile_report(_CONFIG.value, devices, _TRAFFIC.value)
    print(json.dumps(report, indent=2) if _JSON.value else aot.format_report(report))
    for step in report['too_large']:
      name = step.replace('_', ' ')
      dominant = f'{report["dominant"].capitalize()} dominate. ' if step == 'train_step' else ''
      print(f'error: the {name} needs {report[step]["total"] / aot.GIB:.2f} GiB per device, more '
            f'than the {report["device_memory_bytes"] / aot.GIB:.1f} GiB of '
            f'{report["device_memory"]}. {dominant}{aot.FIT_ADVICE[name]}', file=sys.stderr)
    if report['too_large']:
      sys.exit(1)

  common.run_cleanly(run)


if __name__ == '__main__':
  cli.run(main, compilation_cache=False, runs_steps=False)  # It times compiling.
