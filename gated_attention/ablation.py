"""The paper's ablation table, regenerated at any scale: train every variant on the same data
with the same budget and seed, evaluate each, and write a report.

Per run, WORKDIR/runs/NAME holds an ordinary training workdir plus result.json once it is done.
A rerun skips finished runs and resumes an interrupted one from its checkpoint; a finished run
whose config has changed since is evaluated again (eval keys), trained on and evaluated (more
train.steps), or refused (anything its checkpoints were not trained with; `rerun`). A run
whose loss goes non-finite, or ends with a held-out loss above chance (ln model.vocab_size, a
uniform guess), is reported as diverged (at which step) instead of stopping the sweep.
"""

import json
import math
import pathlib

import jax

from gated_attention import config as config_lib
from gated_attention import resume
from gated_attention import state as state_lib
from gated_attention import tokenizer as tokenizer_lib
from gated_attention import workdir as workdir_lib
from gated_attention.checkpoint import write_whole
from gated_attention.distributed import log
from gated_attention.evaluate import evaluate
from gated_attention.metrics import read_metrics
from gated_attention.train import TrainingError, train


# In config.variants: the paper's parameter-matched baselines for the model as configured.
MATCHED_BASELINES = 'matched_baselines'


def parameter_matched_baselines(model) -> list[str]:
  """The paper's ungated baselines with more attention parameters: 1.5x the query heads (its
  q = 48) and twice the KV heads (its k = 8), where the shape can hold them (KV heads must
  divide query heads)."""
  heads, kv_heads = model.num_heads, model.num_kv_heads
  rows = []
  if heads % 2 == 0 and (heads * 3 // 2) % kv_heads == 0:
    rows.append(f'none+num_heads={heads * 3 // 2}')
  if heads % (2 * kv_heads) == 0:
    rows.append(f'none+num_kv_heads={2 * kv_heads}')
  return rows


def sweep(config) -> list[tuple[str, str, float]]:
  """[(run name, variant spec, learning rate)] in order; names carry the LR only when it varies.
  Each run's gate is its variant's (config.set_variant), whatever config.model.gate holds;
  MATCHED_BASELINES stands for parameter_matched_baselines(config.model)."""
  variants = [expanded for variant in config_lib.parse_list(config.variants, 'variants')
              for expanded in (parameter_matched_baselines(config.model)
                               if variant == MATCHED_BASELINES else [variant])]
  rates = (config_lib.parse_list(config.learning_rates, 'learning_rates', float, empty_ok=True)
           or [config.train.learning_rate])
  bad = [rate for rate in rates if not 0 < rate < math.inf]
  if bad:
    raise config_lib.ConfigError(f'--config.learning_rates: {bad[0]} is not a learning rate; '
                                 'give positive finite numbers.')
  runs = [(variant if len(rates) == 1 else f'{variant}_lr{rate:g}', variant, rate)
          for rate in rates for variant in variants]
  names = [name for name, _, _ in runs]
  repeated = sorted({name for name in names if names.count(name) > 1})
  if repeated:  # Two runs of one name would share a run directory.
    raise config_lib.ConfigError(f'--config.variants and --config.learning_rates name the run '
                                 f'{", ".join(repeated)} more than once.')
  return runs


def variant_config(config, variant: str, learning_rate: float):
  """The experiment config of one run: the shared config with this variant's gate and model
  keys (config.set_variant) and this learning rate."""
  run = config.copy_and_resolve_references()
  with run.unlocked():  # Command-line configs arrive locked.
    del run['variants'], run['learning_rates']
  config_lib.set_variant(run.model, variant, '--config.variants')
  run.train.learning_rate = learning_rate
  run.train.min_learning_rate = min(run.train.min_learning_rate, learning_rate)
  try:
    config_lib.validate(run)
  except config_lib.ConfigError as error:
    raise config_lib.ConfigError(f'--config.variants: the run {variant!r}: {error}') from None
  return run


def run_variant(run_config, run_dir: pathlib.Path) -> dict | None:
  """Trains (or resumes) and evaluates one run; returns its row of the table, or None when
  SIGTERM stopped the training (the run is saved; a rerun continues it)."""
  diverged, diverged_at_step = None, None
  try:
    if train(run_config, run_dir)['preempted']:
      return None
  except TrainingError as error:
    diverged, diverged_at_step = str(error), error.step
  records = read_metrics(run_dir) if (run_dir / 'metrics.jsonl').exists() else []
  row = {'config': resume.plain(run_config), 'variant': run_config.model.gate.to_dict(),
         'learning_rate': run_config.train.learning_rate,
         'params': state_lib.num_params(state_lib.abstract_model(run_config.model)[1]),
         'diverged': diverged, 'diverged_at_step': diverged_at_step,
         'loss_spikes': records[-1]['loss_spikes'] if records else 0,
         'loss_curve': [[r['step'], r['loss']] for r in records]}
  if diverged is None:
    row['eval'] = evaluate(run_dir, figures=False)
    chance = math.log(run_config.model.vocab_size)
    if row['eval']['loss'] > chance:  # Finite, but worse than a uniform guess over the vocabulary.
      row['diverged'] = (f'held-out loss {row["eval"]["loss"]:.4g} is above chance, '
                         f'ln(model.vocab_size) = {chance:.3f}')
      row['diverged_at_step'] = records[-1]['step'] if records else None
  return row


# Keys whose change leaves a finished run's result standing: how it runs, not what it computes.
HOW_IT_RUNS = ('mesh', 'model.attention_impl', 'model.remat', 'model.scan_layers',
               'model.moe.impl', 'train.microbatches', 'train.log_every',
               'train.checkpoint_every', 'train.keep_checkpoints', 'train.profile_steps',
               'train.profile_after', 'train.peak_flops_per_device')


def rerun(finished_config: dict | None, run_config, run_dir: pathlib.Path) -> str | None:
  """What a rerun does with a finished run, given the config it finished with (None: unknown,
  from before results kept it): None keeps its row; 'evaluate' evaluates it again (eval keys
  changed); 'continue' trains it on to more train.steps, then evaluates. Any other change is a
  ConfigError naming it: its checkpoints were trained otherwise."""
  if finished_config is None:
    return None
  changes = {key: change for key, change in resume.differences(
      config_lib.upgrade(finished_config), resume.plain(run_config)).items()
             if not any(key == kept or key.startswith(kept + '.') for kept in HOW_IT_RUNS)}
  steps = changes.pop('train.steps', None)
  evaluation = [key for key in changes if key.startswith('eval.')]
  for key in evaluation:
    del changes[key]
  if steps and steps[1] < steps[0]:
    changes['train.steps'] = steps
  if changes:
    raise config_lib.ConfigError(
        f'{run_dir} finished with another config ({resume.describe(changes)}); its checkpoints '
        f'were trained that way: use another --workdir, or delete {run_dir} to run it anew.')
  return 'continue' if steps else 'evaluate' if evaluation else None


def run_ablation(config, workdir) -> dict:
  """Runs the whole sweep (skipping finished runs, `rerun` says what else) and writes
  report.md, results.json, PNGs; every run's config is checked first, and the sweep holds its
  workdir alone throughout."""
  runs = [(name, variant, rate, variant_config(config, variant, rate))
          for name, variant, rate in sweep(config)]
  with workdir_lib.hold(workdir):
    workdir = pathlib.Path(workdir)
    finished = {}
    for name, _, _, run_config in runs:  # Every finished run checked before any starts.
      done = workdir / 'runs' / name / 'result.json'
      if done.exists():
        row = json.loads(done.read_text())
        finished[name] = (row, rerun(row.get('config'), run_config, done.parent))
    return _run_sweep(config, runs, finished, workdir)


def _run_sweep(config, runs, finished: dict, workdir: pathlib.Path) -> dict:
  results = {}
  for index, (name, variant, rate, run_config) in enumerate(runs, start=1):
    run_dir = workdir / 'runs' / name
    row, again = finished.get(name, (None, None))
    if row is not None and again is None:
      log(f'[{index}/{len(runs)}] {name}: finished earlier, skipped')
      results[name] = row
      continue
    log(f'[{index}/{len(runs)}] {name}: variant {variant}, learning_rate={rate:g}'
        + (f' ({again} the finished run)' if again else ''))
    previous = row
    row = run_variant(run_config, run_dir)
    if row is None:
      log(f'preempted during {name}: rerun the same command to continue the sweep')
      return results
    if again == 'continue':  # Its schedule ran to the old steps, then on to the new.
      row['continued_from_steps'] = (previous.get('continued_from_steps') or
                                     previous['config']['train']['steps'])
    results[name] = row
    if jax.process_index() == 0:  # Every process ran it; one writes what it found.
      write_whole(run_dir / 'result.json', json.dumps(row, indent=2))

  baseline = next((results[name]['params'] for name, variant, _, _ in runs
                   if variant == 'none' and name in results), None)
  for row in results.values():
    row['added_params'] = None if baseline is None else row['params'] - baseline
  if jax.process_index() == 0:
    write_whole(workdir / 'results.json', json.dumps(results, indent=2))
    write_whole(workdir / 'report.md', report(results, config))
    from gated_attention import plots  # matplotlib only where figures are drawn.
    plots.ablation_figures(results, workdir)
  log(f'wrote {workdir / "report.md"}, {workdir / "results.json"} and figures')
  return results


def _cell(value, fmt: str) -> str:
  return '–' if value is None else format(value, fmt)


def report(results: dict, config) -> str:
  """The table in the paper's style, as Markdown."""
  lines = [
      f'# Ablation: {config.model.num_layers} layers, d_model {config.model.d_model}, '
      f'{config.train.steps} steps of {config.data.batch_size} x {config.data.seq_len} tokens '
      f'({config.data.source} corpus), seed {config.train.seed}',
      '',
      '| run | added params | LR | held-out loss | PPL | first-token attn | max act (mean) '
      '| gate score | loss-spike steps |',
      '|---|---|---|---|---|---|---|---|---|']
  for name, row in results.items():
    added = row.get('added_params')
    if row['diverged']:
      lines.append(f'| {name} | {_cell(added, "+,")} | {row["learning_rate"]:g} | '
                   f'diverged at step {row["diverged_at_step"]} | – | – | – | – | '
                   f'{row["loss_spikes"]} |')
      continue
    result = row['eval']
    gate = result['gate_score']['mean'] if result['gate_score'] else None
    lines.append(
        f'| {name} | {_cell(added, "+,")} | {row["learning_rate"]:g} | {result["loss"]:.4f} | '
        f'{result["perplexity"]:.3f} | {result["first_token_attention"]["mean"]:.3f} | '
        f'{result["max_activation"]["mean_of_layer_max"]:.1f} | {_cell(gate, ".3f")} | '
        f'{row["loss_spikes"]} |')
  unit = ('byte-level token' if config.data.tokenizer == tokenizer_lib.BYTE
          else f'token of {config.data.tokenizer}')
  lines += ['', f'Held-out loss is nats per {unit}; first-token attention and max activation '
            'are the paper\'s F-Attn and M-Act (see README).', '']
  return '\n'.join(lines)
