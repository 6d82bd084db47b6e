"""Generates text from a workdir's checkpoint with a KV cache:

  python -m experiments.generate --workdir=DIR --prompt='def gated(' --max_new_tokens=64
      [--prompts_file=FILE (one prompt a line)] [--prompt_ids=ID,ID,... (repeatable)]
      [--temperature=0 --top_k=0 --top_p=1 --seed=0] [--batch_size=8] [--step=N]
      [--mesh=data=1,fsdp=-1,tensor=1,expert=1] [--json]

Greedy at temperature 0. Prints each prompt's completion, then prefill and decode tokens/s
(without compilation); --json prints one object with the generated ids and text of each prompt
and the timings.
"""

import json
import pathlib

from absl import flags

from experiments import cli, common
from gated_attention.config import ConfigError, trained_context
from gated_attention.distributed import warn
from gated_attention.evaluate import restore_run
from gated_attention.generate import Generator, Sampling, prompt_ids
from gated_attention.tokenizer import load_tokenizer

_WORKDIR = flags.DEFINE_string('workdir', None, 'Training run directory.', required=True)
_STEP = flags.DEFINE_integer('step', None, 'Checkpoint step (default: the latest).')
_PROMPT = flags.DEFINE_multi_string('prompt', [], 'A text prompt (repeatable).')
_PROMPTS_FILE = flags.DEFINE_string('prompts_file', None, 'A file of prompts, one a line.')
_PROMPT_IDS = flags.DEFINE_multi_string('prompt_ids', [], 'A prompt as token ids ID,ID,... '
                                        '(repeatable), for a model without a tokenizer.')
_MAX_NEW = flags.DEFINE_integer('max_new_tokens', 32, 'Tokens to generate per prompt.')
_TEMPERATURE = flags.DEFINE_float('temperature', 0.0, 'Sampling temperature; 0 is greedy.')
_TOP_K = flags.DEFINE_integer('top_k', 0, 'Sample among the k most likely tokens (0: all).')
_TOP_P = flags.DEFINE_float('top_p', 1.0, 'Sample within this much probability (nucleus).')
_SEED = flags.DEFINE_integer('seed', 0, 'Sampling seed.')
_BATCH = flags.DEFINE_integer('batch_size', 8, 'Prompts generated together.')
_MESH = flags.DEFINE_string('mesh', 'data=1,fsdp=-1,tensor=1,expert=1', 'Mesh for generation.')
_JSON = flags.DEFINE_bool('json', False, 'Print one JSON object.')


def _prompts(tokenizer, vocab_size: int) -> list[list[int]]:
  """Every prompt as ids, checked before anything heavy runs."""
  texts = list(_PROMPT.value)
  if _PROMPTS_FILE.value:
    try:
      # Bytes, as training read its documents: each tokenizer reads them as it read those.
      texts += [line for line in pathlib.Path(_PROMPTS_FILE.value).read_bytes().splitlines()
                if line.strip()]
    except OSError as error:
      raise ConfigError(f'--prompts_file={_PROMPTS_FILE.value!r}: {error.strerror}.') from None
  if texts and tokenizer is None:
    raise ConfigError('this model has no tokenizer (data.tokenizer=\'none\'): give prompts as '
                      '--prompt_ids=ID,ID,...')
  prompts = [prompt_ids(tokenizer, text) for text in texts]
  for value in _PROMPT_IDS.value:
    try:
      prompts.append([int(i) for i in value.split(',')])
    except ValueError:
      raise ConfigError(f'--prompt_ids={value!r}: expected integers separated by commas.') from None
    if not all(0 <= i < vocab_size for i in prompts[-1]):
      raise ConfigError(f'--prompt_ids={value!r}: ids must be in [0, {vocab_size}) '
                        '(model.vocab_size).')
  if not prompts:
    raise ConfigError('no prompt: give --prompt, --prompts_file or --prompt_ids.')
  return prompts


def _check_flags() -> None:
  """One error naming the first flag out of range (NaN included)."""
  for flag, ok, accepted in ((_MAX_NEW, _MAX_NEW.value >= 1, '>= 1'),
                             (_BATCH, _BATCH.value >= 1, '>= 1'),
                             (_TEMPERATURE, _TEMPERATURE.value >= 0, '>= 0 (0 is greedy)'),
                             (_TOP_K, _TOP_K.value >= 0, '>= 0 (0: all tokens)'),
                             (_TOP_P, 0 < _TOP_P.value <= 1, 'in (0, 1]')):
    if not ok:
      raise ConfigError(f'--{flag.name}={flag.value} must be {accepted}.')


def _generate():
  """(step, tokenizer, prompts, Generation) of the flags."""
  config, mesh, graphdef, params, step = restore_run(
      _WORKDIR.value, _STEP.value, common.parse_mesh(_MESH.value), check_eval_batch=False)
  tokenizer = load_tokenizer(config.data.tokenizer)
  prompts = _prompts(tokenizer, config.model.vocab_size)
  longest, context = max(map(len, prompts)) + _MAX_NEW.value, trained_context(config)
  if longest > context and step > 0:  # Step 0 is an import, whose context its config lacks.
    warn(f'up to {longest} tokens (the longest prompt and --max_new_tokens), past the {context} '
         'this model was trained for: what comes past it is extrapolation.')
  generator = Generator(graphdef, params, config.model, mesh)
  sampling = Sampling(_TEMPERATURE.value, _TOP_K.value, _TOP_P.value)
  eos_id = None if tokenizer is None else tokenizer.eos_id
  return step, tokenizer, prompts, generator.generate(prompts, _MAX_NEW.value, sampling,
                                                      _SEED.value, eos_id, _BATCH.value)


def main(argv):
  del argv

  def run():
    _check_flags()
    with common.progress_to_stderr(_JSON.value):
      step, tokenizer, prompts, generation = _generate()
    tokens, timing = generation.tokens, generation.timing
    texts = [None if tokenizer is None else tokenizer.decode(ids) for ids in tokens]
    if _JSON.value:
      print(json.dumps({'step': step, 'completions': [
          {'prompt_ids': p, 'token_ids': ids, 'text': text}
          for p, ids, text in zip(prompts, tokens, texts)], **timing}))
      return
    for prompt, ids, text in zip(prompts, tokens, texts):
      print(f'--- {prompt if text is None else tokenizer.decode(prompt)!r}')
      print(ids if text is None else text)
    print(f'step {step}: prefill {timing["prefill_tokens"]} tokens at '
          f'{timing["prefill_tokens_per_sec"]:,.0f} tokens/s, decode {timing["decode_tokens"]} '
          f'tokens at {timing["decode_tokens_per_sec"]:,.0f} tokens/s (compile '
          f'{timing["compile_seconds"]:.1f} s' + (f', {timing["compile_cache_hits"]} program(s) '
          'from the compilation cache)' if timing['compile_cache_hits'] else ')'))

  common.run_cleanly(run)


if __name__ == '__main__':
  cli.run(main)
