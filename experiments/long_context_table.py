"""The laptop Table 5 (configs/long_context.py) as Markdown, from the runs' long_eval results:

  python -m experiments.long_context_table --runs=/tmp/lc

Reads RUNS/<gate>_s<seed>_<stage>/long_eval/step_N.json (the latest N of each run) and prints
one table per measure, a row per gate and stage, seeds averaged (each seed's value beside);
columns are the lengths (every run's the same) and the tasks every run was evaluated at.
"""

import collections
import json
import pathlib
import re
import sys

from absl import flags

from experiments import cli
from gated_attention.long_eval import comparison_tables

_RUNS = flags.DEFINE_string('runs', '/tmp/lc', 'Directory holding the runs.')


def _read_result(path: pathlib.Path) -> dict:
  """A long_eval result file, or one error naming it."""
  try:
    result = json.loads(path.read_text())
  except (OSError, json.JSONDecodeError) as error:
    cli.fail(f'{path}: cannot read it as a long_eval result ({error}); run long_eval again.')
  if not isinstance(result, dict) or 'lengths' not in result:
    cli.fail(f'{path} is not a long_eval result (no "lengths"); run long_eval again.')
  return result


def main(argv):
  del argv
  rows, skipped = collections.defaultdict(list), []
  runs = pathlib.Path(_RUNS.value)
  for run in sorted(runs.iterdir() if runs.is_dir() else ()):
    results = sorted((path for path in (run / 'long_eval').glob('step_*.json')
                      if re.fullmatch(r'step_\d+', path.stem)),
                     key=lambda path: int(path.stem.split('_')[1]))
    name = re.fullmatch(r'(.+)_s\d+_([^_]+)', run.name)
    if results and name:
      rows[f'{name[1]} {name[2]}'].append(_read_result(results[-1]))
    elif results:
      skipped.append(run.name)
  if skipped:
    print(f'warning: skipped {", ".join(skipped)}: not named <gate>_s<seed>_<stage>',
          file=sys.stderr)
  if not rows:
    cli.fail(f'--runs={_RUNS.value}: no run there holds long_eval results.')
  try:
    print(comparison_tables(dict(sorted(rows.items()))))
  except ValueError as error:
    cli.fail(f'--runs={_RUNS.value}: {error}')


if __name__ == '__main__':
  cli.run(main)
