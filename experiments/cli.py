"""Command lines: flags and config overrides refused as they are parsed, in one line
`error: ...` with exit status 1, for every main (`run` in place of absl's app.run)."""

import os
import re
import sys

import jax
from absl import app, flags
from ml_collections import config_flags

from gated_attention import distributed

_EXCEPTION_NAME = re.compile(r'^[A-Za-z_][\w.]*(Error|Exception): ')


def fail(message: str, status: int = 1):
  """Prints 'error: message' and exits with `status` at once."""
  print(f'error: {message}', file=sys.stderr, flush=True)
  sys.stdout.flush()
  # Exit now: after a failed restore or save, orbax's background work fails again during
  # interpreter teardown and would bury the one-line error under reports of the same failure.
  os._exit(status)


def _command_line_error(error: Exception, argv) -> str:
  """One line for a command line that absl or ml_collections refused."""
  if isinstance(error, (KeyError, AttributeError)):  # An override of a key the config lacks.
    text = error
    while isinstance(text, BaseException) and text.args:
      text = text.args[0]
    key, _, hint = str(text).partition('\n')
    key = key.strip('\'"')
    flag = next((arg.split('=')[0] for arg in argv
                 if arg.startswith('--config.') and key in arg.split('=')[0].split('.')),
                '--config')
    return f'{flag}: the config has no key {key!r}.' + (f' {hint}' if hint else '')
  lines = [line.strip() for line in str(error).splitlines() if line.strip()]
  if 'as a ConfigDict' in str(error):  # A whole block given a value: --config.model.gate=NAME.
    value = str(error).split("'")[1] if "'" in str(error) else ''
    flag = next((arg for arg in argv if arg.startswith('--config.') and arg.endswith(f'={value}')),
                repr(value))
    return (f'{flag}: a config block, not a value: set its keys one by one '
            '(--config.model.gate.position=sdpa ...), or name a variant in the config argument '
            '(--config=configs/lm.py:gate=g1_headwise).')
  if len(lines) > 1:  # A config file's own error comes with its traceback: keep its last line.
    return f'{lines[0]} {_EXCEPTION_NAME.sub("", lines[-1])}'
  return lines[0] if lines else type(error).__name__


def define_config(default: str, help_string: str = 'Experiment config file.'):
  """config_flags.DEFINE_config_file; without --config the default file and its --config.*
  overrides are read right here, so a bad override is refused here, in one line."""
  try:
    return config_flags.DEFINE_config_file('config', default, help_string)
  except Exception as error:  # ml_collections raises KeyError, AttributeError, ValueError...
    fail(_command_line_error(error, sys.argv))


def refuse_gate_overrides(config, variants_flag: str) -> None:
  """Refuses --config.model.gate.* in a command whose `variants_flag`, a list of variants, sets
  each run's gate (`config`: the holder define_config returned): the key would be replaced."""
  for key, value in config_flags.get_override_values(flags.FLAGS[config.name]).items():
    if key.startswith('model.gate.'):
      fail(f'--config.{key}={value}: {variants_flag} sets each run\'s gate, so a gate key for '
           f'every run would be ignored; give it to the runs it is for: {variants_flag}='
           f'g1_elementwise+gate.{key.removeprefix("model.gate.")}={value}.')


def _parse_flags(argv):
  """absl's flag parsing, every refusal one line; a config file that failed to load is refused
  here rather than when main first reads it."""
  try:
    remaining = flags.FLAGS(argv)
    if 'config' in flags.FLAGS:
      flags.FLAGS.config.keys()
    return remaining
  except Exception as error:  # absl and ml_collections raise many types for bad flags.
    fail(_command_line_error(error, argv))


def run(main, compilation_cache: bool = True, runs_steps: bool = True) -> None:
  """app.run(main), with every flag error one line, in a process that keeps its freed host
  memory where it runs steps on a CPU (`distributed.keep_freed_host_memory`: XLA:CPU steps ~15%
  faster; it slows multi-threaded compilers, libtpu's by a fifth to a third), starts the TPU
  runtime quietly where no TPU chip is attached, and keeps compiled programs on disk
  (`distributed.use_compilation_cache`) unless `compilation_cache` is False: for the commands
  that time compiling. runs_steps=False: a command that only compiles."""
  if runs_steps and distributed.steps_run_on_cpu():
    distributed.keep_freed_host_memory()
  if not distributed.tpu_chips_attached():
    distributed.quiet_tpu_runtime()
  if compilation_cache:
    distributed.use_compilation_cache()
  else:
    jax.config.update('jax_enable_compilation_cache', False)
  app.run(main, flags_parser=_parse_flags)
