"""Exports a workdir's checkpoint as a Hugging Face model directory that transformers loads:

  python -m experiments.export_hf --workdir=DIR --out=HF_DIR [--step=N]
      [--format=auto|qwen3|qwen3_moe|qwen3_next|paper_release] [--max_shard_mb=2048]

auto writes an ungated model as qwen3 (dense) or qwen3_moe, a G1 elementwise model as
qwen3_next (every layer full attention) and a G1 headwise one in the paper's release layout
(qwen3 with its gate flags, read by the release's modeling code). A variant no format holds is
refused, naming the config key. The tokenizer goes along (the byte tokenizer as a
tokenizer.json), so `lm_eval --model hf --model_args pretrained=HF_DIR` runs on it.
"""

from absl import flags

from experiments import cli, common
from gated_attention.hf import export_hf

_WORKDIR = flags.DEFINE_string('workdir', None, 'Training run directory.', required=True)
_OUT = flags.DEFINE_string('out', None, 'Hugging Face model directory to write.', required=True)
_STEP = flags.DEFINE_integer('step', None, 'Checkpoint step (default: the latest).')
_FORMAT = flags.DEFINE_string('format', 'auto', 'auto, qwen3, qwen3_moe, qwen3_next or '
                              'paper_release.')
_MAX_SHARD_MB = flags.DEFINE_integer('max_shard_mb', 2048, 'Largest safetensors file (MiB).',
                                     lower_bound=1)
_MAX_POSITIONS = flags.DEFINE_integer('max_position_embeddings', None,
                                      'max_position_embeddings (default: data.seq_len; with YaRN, '
                                      'original_max_position x factor).',
                                      lower_bound=1)


def main(argv):
  del argv

  def run():
    summary = export_hf(_WORKDIR.value, _OUT.value, _STEP.value, _FORMAT.value,
                        _MAX_SHARD_MB.value * 2**20, _MAX_POSITIONS.value)
    if summary is None:  # Another process wrote the files.
      return
    megabytes = summary['bytes'] / 2**20
    print(f'exported step {summary["step"]} as {summary["format"]}: {summary["tensors"]} tensors '
          f'in {summary["files"]} file(s), {megabytes:,.1f} MB in {summary["seconds"]:.2f} s '
          f'({megabytes / max(summary["seconds"], 1e-9):,.0f} MB/s) into {_OUT.value}')

  common.run_cleanly(run)


if __name__ == '__main__':
  cli.run(main)
