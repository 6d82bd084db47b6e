"""Tokenizes a text corpus once into ArrayRecord files for data.source=array_record:

  python -m experiments.prepare_data --input='corpus/**/*.txt' --output_dir=data/corpus --seq_len=256
      [--tokenizer=byte|PATH/tokenizer.json]

writes OUTPUT_DIR/train.array_record and OUTPUT_DIR/heldout.array_record with the same document
split and examples that data.source=text_files would give (a tokenizer.json tokenizes in
parallel, with a progress bar); then train with the same --config.data.tokenizer and
  --config.data.source=array_record --config.data.path=OUTPUT_DIR/train.array_record
  --config.data.eval_path=OUTPUT_DIR/heldout.array_record --config.data.seq_len=256
"""

import pathlib

import jax
from absl import flags

from experiments import cli, common
from gated_attention import config as config_lib
from gated_attention import data
from gated_attention.tokenizer import load_tokenizer

_INPUT = flags.DEFINE_string('input', None, 'Glob of text files (** allowed).', required=True)
_OUTPUT_DIR = flags.DEFINE_string('output_dir', None, 'Directory for the ArrayRecord files.',
                                  required=True)
_SEQ_LEN = flags.DEFINE_integer('seq_len', 256, 'Tokens per example (the model reads seq_len).',
                               lower_bound=1)
_HELDOUT = flags.DEFINE_float('heldout_fraction', 0.05, 'Fraction of documents held out.')
_TOKENIZER = flags.DEFINE_string('tokenizer', 'byte', "'byte' or a Hugging Face tokenizer.json.")
flags.register_validator('heldout_fraction', lambda fraction: 0 < fraction < 1,
                         '--heldout_fraction must be in (0, 1).')


def main(argv):
  del argv

  def prepare():
    data_config = config_lib.base_config().data
    data_config.update(source='text_files', path=_INPUT.value, seq_len=_SEQ_LEN.value,
                       heldout_fraction=_HELDOUT.value, tokenizer=_TOKENIZER.value)
    tokenizer = load_tokenizer(_TOKENIZER.value)  # A bad path fails here, before any reading.
    if tokenizer is None:
      raise config_lib.ConfigError(f'--tokenizer={_TOKENIZER.value!r}: text files need a '
                                   "tokenizer: 'byte' or the path of a tokenizer.json.")
    if jax.process_index() != 0:  # Launched as several processes: one writes the files.
      return
    # Both splits before either file: a split that cannot be made leaves no file behind.
    print(f'reading and tokenizing {_INPUT.value} ...', flush=True)
    splits = {split: data.load_split(data_config, split, tokenizer.vocab_size)
              for split in ('train', 'heldout')}
    output = pathlib.Path(_OUTPUT_DIR.value)
    output.mkdir(parents=True, exist_ok=True)
    for split, examples in splits.items():
      path = output / f'{split}.array_record'
      count = data.write_array_record(examples, path)
      print(f'{path}: {count:,} examples of {_SEQ_LEN.value + 1} tokens')

  def prepare_naming_flags():
    """prepare(), its errors naming this command's flags, not the config keys they set."""
    try:
      prepare()
    except (config_lib.ConfigError, data.DataError) as error:
      message = str(error)
      for key, flag in (('data.tokenizer', '--tokenizer'), ('data.seq_len', '--seq_len'),
                        ('data.path', '--input'), ('data.heldout_fraction', '--heldout_fraction')):
        message = message.replace(key, flag)
      raise config_lib.ConfigError(message) from None

  common.run_cleanly(prepare_naming_flags)


if __name__ == '__main__':
  cli.run(main)
