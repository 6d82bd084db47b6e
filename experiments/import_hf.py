"""Imports a Hugging Face model directory as a workdir that eval, generate and train accept:

  python -m experiments.import_hf --hf_dir=DIR --workdir=OUT [--mesh=data=1,fsdp=-1,tensor=1,expert=1]
      [--param_dtype=float32] [--config=configs/lm.py --config.data.seq_len=512 ...]

The architecture comes from DIR/config.json (qwen3, the paper's release with its gate flags,
qwen3_moe, qwen3_next with every layer full attention); --config supplies the rest (data, eval,
train, mesh, and the model's attention_impl, compute dtype, scan_layers, remat). Writes
OUT/config.json, OUT/tokenizer/ (when DIR has a tokenizer.json) and a step-0 checkpoint of the
parameters; `experiments.train --config=configs/workdir.py:workdir=OUT --workdir=OUT` continues
training from it.
"""

import sys

from absl import flags

from experiments import cli, common
from gated_attention import config as config_lib
from gated_attention.distributed import log
from gated_attention.hf import import_hf

_CONFIG = cli.define_config('configs/lm.py', 'Config for everything but the architecture.')
_HF_DIR = flags.DEFINE_string('hf_dir', None, 'Hugging Face model directory.', required=True)
_WORKDIR = flags.DEFINE_string('workdir', None, 'Workdir to create.', required=True)
_MESH = flags.DEFINE_string('mesh', 'data=1,fsdp=-1,tensor=1,expert=1',
                            'Mesh the parameters are placed on as they are read.')
_PARAM_DTYPE = flags.DEFINE_enum('param_dtype', None, list(config_lib.DTYPES),
                                 "Parameter dtype (default: the checkpoint's).")


def main(argv):
  del argv

  def run():
    mesh = common.parse_mesh(_MESH.value)
    overrides = tuple(arg.split('=')[0][len('--config.model.'):] for arg in sys.argv[1:]
                      if arg.startswith('--config.model.'))
    summary = import_hf(_HF_DIR.value, _WORKDIR.value, _CONFIG.value, mesh, _PARAM_DTYPE.value,
                        overrides)
    megabytes = summary['bytes'] / 2**20
    log(f'imported {summary["format"]}: {summary["parameters"]:,} parameters in '
        f'{summary["tensors"]} tensors, {megabytes:,.1f} MB in {summary["seconds"]:.2f} s '
        f'({megabytes / max(summary["seconds"], 1e-9):,.0f} MB/s) into {_WORKDIR.value}; '
        f'tokenizer: {summary["tokenizer"]}')

  common.run_cleanly(run)


if __name__ == '__main__':
  cli.run(main)
