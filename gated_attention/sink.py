"""The attention-sink comparison: the ablation sweep (gated_attention/ablation.py) on the
Bigram-Backcopy task for each of several seeds, plus how the sink forms during training.

WORKDIR/seed_<S> is an ordinary ablation sweep (its runs, report and figures). On top of it:

  report.md     one row per variant and seed: held-out loss, first-token attention of the most
                sink-like head (the highest over non-trigger queries) for non-trigger and trigger
                queries, |v| of the first token against the others for that head, M-Act, gate
                score, and the first checkpoint at which the sink reached SINK_THRESHOLD;
  results.json  {variant: {seed_<S>: that row with the per-head values: first_token_attention
                {all, trigger, non_trigger} [layers][heads]}};
  sink.png      the most sink-like head's non-trigger first-token attention against the step;
  attention_maps_seed_<S>.png  every variant's attention maps side by side.

A rerun skips what is done, like the sweep.
"""

import json
import pathlib

import jax
import numpy as np

from gated_attention import ablation
from gated_attention import workdir as workdir_lib
from gated_attention.checkpoint import write_whole
from gated_attention.distributed import log
from gated_attention.evaluate import first_token_attention_by_step, sink_scores

SINK_THRESHOLD = 0.3  # Guo et al.'s 1-layer run passed it between steps 200 and 500.
CURVE_BATCHES = 2  # Held-out batches per checkpoint for the curve.


def seed_config(config, seed: int):
  """The sweep config with train.seed = seed (model init and data order; the BB sequences
  themselves come from data.bigram_backcopy.seed, shared by every seed)."""
  seeded = config.copy_and_resolve_references()
  with seeded.unlocked():
    seeded.train.seed = seed
  return seeded


def sink_curve(run_dir: pathlib.Path, run_config: dict) -> list[list]:
  """[[step, sink score of the most sink-like head]] over the run's checkpoints; computed once
  per run config (as its result row holds it) and kept in RUN_DIR/sink_curve.json."""
  path = run_dir / 'sink_curve.json'
  if path.exists():
    kept = json.loads(path.read_text())
    if isinstance(kept, dict) and kept['config'] == run_config:
      return kept['curve']
  curve = [[step, float(sink_scores(first_token).max())] for step, first_token in
           first_token_attention_by_step(run_dir, CURVE_BATCHES).items()]
  if jax.process_index() == 0:  # Every process computed it; one writes it.
    write_whole(path, json.dumps({'config': run_config, 'curve': curve}))
  return curve


def sink_row(row: dict, curve: list) -> dict:
  """One run's entry of results.json from its ablation row and sink curve."""
  if row['diverged']:
    return {'diverged': row['diverged'], 'diverged_at_step': row['diverged_at_step'],
            'curve': curve}
  result = row['eval']
  first_token = result['first_token_attention']
  scores = sink_scores(first_token)
  layer, head = np.unravel_index(np.argmax(scores), scores.shape)
  value_norm = result['value_norm']
  kv_head = head // (scores.shape[1] // len(value_norm['first_token'][layer]))
  crossed = [step for step, score in curve if score >= SINK_THRESHOLD]
  return {
      'loss': result['loss'],
      'first_token_attention': {'all': first_token['per_layer_head'],
                                **{kind: first_token[kind] for kind in ('trigger', 'non_trigger')
                                   if kind in first_token}},
      'sink_head': {'layer': int(layer), 'head': int(head),
                    'non_trigger': float(scores[layer, head]),
                    'trigger': (first_token['trigger'][layer][head]
                                if 'trigger' in first_token else None),
                    'value_norm_first_token': value_norm['first_token'][layer][kv_head],
                    'value_norm_others': value_norm['others'][layer][kv_head]},
      'value_norm': value_norm,
      'max_activation': result['max_activation']['mean_of_layer_max'],
      'gate_score': result['gate_score']['mean'] if result['gate_score'] else None,
      'sink_step': crossed[0] if crossed else None,
      'curve': curve,
      'eval_step': result['step'],
  }


def run_sink_comparison(config, workdir, seeds: list[int]) -> dict | None:
  """Runs the sweep of `config` (its `variants`) once per seed, then writes report.md,
  results.json and the figures; returns the results, or None when a run was preempted (a rerun
  continues)."""
  runs = ablation.sweep(config)
  for seed in seeds:  # Every run of every seed refused, if it must be, before any starts.
    for _, variant, rate in runs:
      ablation.variant_config(seed_config(config, seed), variant, rate)
  with workdir_lib.hold(workdir):
    return _run_seeds(config, pathlib.Path(workdir), seeds, len(runs))


def _run_seeds(config, workdir: pathlib.Path, seeds: list[int], num_runs: int) -> dict | None:
  results = {}
  for seed in seeds:
    log(f'seed {seed}: {num_runs} runs')
    seed_dir = workdir / f'seed_{seed}'
    rows = ablation.run_ablation(seed_config(config, seed), seed_dir)
    if len(rows) < num_runs:
      return None
    for name, row in rows.items():
      log(f'seed {seed}, {name}: first-token attention at each checkpoint')
      results.setdefault(name, {})[f'seed_{seed}'] = sink_row(
          row, sink_curve(seed_dir / 'runs' / name, row['config']))
  if jax.process_index() == 0:  # Every process ran the runs; one writes what they found.
    write_whole(workdir / 'results.json', json.dumps(results, indent=2))
    write_whole(workdir / 'report.md', report(results, config, seeds))
    _figures(results, workdir, seeds)
  log(f'wrote {workdir / "report.md"}, {workdir / "results.json"} and figures')
  return results


def _figures(results: dict, workdir: pathlib.Path, seeds: list[int]) -> None:
  from gated_attention import plots  # matplotlib only where figures are drawn.
  plots.sink_curves({f'{name} seed {key[5:]}': row['curve'] for name, by_seed in results.items()
                     for key, row in by_seed.items()}, workdir / 'sink.png', SINK_THRESHOLD)
  for seed in seeds:
    maps = {}
    for name, by_seed in results.items():
      row = by_seed[f'seed_{seed}']
      if 'eval_step' in row:
        eval_dir = workdir / f'seed_{seed}' / 'runs' / name / 'eval'
        maps[name] = (np.load(eval_dir / f'step_{row["eval_step"]}_attention_maps.npy'),
                      np.asarray(row['first_token_attention'].get(
                          'non_trigger', row['first_token_attention']['all'])))
    plots.attention_map_grid(maps, workdir / f'attention_maps_seed_{seed}.png',
                             f'attention maps, first 64 positions, seed {seed}')


def _cell(value, fmt: str) -> str:
  return '–' if value is None else format(value, fmt)


def report(results: dict, config, seeds: list[int]) -> str:
  """The comparison as a Markdown table, one row per variant and seed."""
  lines = [
      f'# Attention sink on Bigram-Backcopy: {config.model.num_layers} layer(s), d_model '
      f'{config.model.d_model}, {config.model.num_heads} heads, {config.train.steps} steps of '
      f'{config.data.batch_size} x {config.data.seq_len} tokens, LR '
      f'{config.train.learning_rate:g}, seeds {", ".join(map(str, seeds))}',
      '',
      '| variant | seed | held-out loss | F-Attn non-trigger (sink head) | F-Attn trigger '
      '(sink head) | \\|v\\| first / others (sink head) | M-Act | gate score | sink >= '
      f'{SINK_THRESHOLD} at step |',
      '|---|---|---|---|---|---|---|---|---|']
  for name, by_seed in results.items():
    for key, row in by_seed.items():
      seed = key[len('seed_'):]
      if 'diverged' in row:
        lines.append(f'| {name} | {seed} | diverged at step {row["diverged_at_step"]} '
                     '| – | – | – | – | – | – |')
        continue
      head = row['sink_head']
      lines.append(
          f'| {name} | {seed} | {row["loss"]:.4f} | {head["non_trigger"]:.3f} (L{head["layer"]} '
          f'h{head["head"]}) | {_cell(head["trigger"], ".3f")} | '
          f'{head["value_norm_first_token"]:.2f} / {head["value_norm_others"]:.2f} | '
          f'{row["max_activation"]:.1f} | {_cell(row["gate_score"], ".3f")} | '
          f'{"never" if row["sink_step"] is None else row["sink_step"]} |')
  lines += [
      '', 'F-Attn: attention on the first token (BOS), per head, averaged over held-out queries '
      'of one type: trigger queries (input token a trigger: the head must copy) or non-trigger '
      'queries (the rest: a dormant head parks on BOS). The sink head is the head with the '
      'highest non-trigger F-Attn. M-Act: mean over layers of the max |hidden state|. The sink '
      f'step is the first saved checkpoint whose sink head reached {SINK_THRESHOLD} (measured on '
      f'{CURVE_BATCHES} held-out batches). Per-head values: results.json; figures: sink.png, '
      'attention_maps_seed_<S>.png.', '']
  return '\n'.join(lines)
