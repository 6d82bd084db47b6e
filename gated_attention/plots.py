"""PNG figures of evaluations and ablations (matplotlib, no display needed)."""

import pathlib

import matplotlib

matplotlib.use('Agg')
import matplotlib.pyplot as plt  # noqa: E402  (the backend must be chosen first)
import numpy as np  # noqa: E402


def _save(figure, path: pathlib.Path) -> None:
  figure.tight_layout()
  figure.savefig(path, dpi=120)
  plt.close(figure)


def _per_layer_bars(values, ylabel: str, title: str, path: pathlib.Path) -> None:
  figure, axis = plt.subplots(figsize=(6, 3.5))
  axis.bar(np.arange(len(values)), values, color='tab:blue')
  axis.set_xticks(np.arange(len(values)))
  axis.set_xlabel('layer')
  axis.set_ylabel(ylabel)
  axis.set_title(title)
  _save(figure, path)


def _line_plot(series: dict, xlabel: str, ylabel: str, title: str, path: pathlib.Path,
               log_scale: bool = False, threshold: float | None = None) -> None:
  """One line per {label: [[x, y], ...]} (empty series skipped); an optional dashed threshold."""
  figure, axis = plt.subplots(figsize=(7, 4.5))
  axis.set_prop_cycle(color=plt.cm.tab20.colors)  # Enough distinct colours for many runs.
  for label, points in series.items():
    if points:
      xs, ys = zip(*points)
      axis.plot(xs, ys, label=label, linewidth=1)
  if threshold is not None:
    axis.axhline(threshold, color='grey', linestyle='--', linewidth=0.8)
  axis.set_xlabel(xlabel)
  axis.set_ylabel(ylabel)
  if log_scale:
    axis.set_yscale('log')
  axis.legend(fontsize=7)
  axis.set_title(title)
  _save(figure, path)


def attention_map_grid(rows: dict, path: pathlib.Path, title: str) -> None:
  """Attention maps (query x key, white = 1) side by side: one row per {label: (attention_map
  [layers, heads, m, m], sink_scores [layers, heads])}, and per layer two panels, the mean over
  heads and the most sink-like head (the highest sink score)."""
  num_layers = max(maps.shape[0] for maps, _ in rows.values())
  figure, axes = plt.subplots(len(rows), 2 * num_layers, squeeze=False, layout='constrained',
                              figsize=(max(2.6 * 2 * num_layers, 6), 2.6 * len(rows) + 0.8))
  for row, (label, (maps, scores)) in zip(axes, rows.items()):
    for layer in range(num_layers):
      head = int(np.argmax(scores[layer]))
      panels = ((maps[layer].mean(axis=0), f'L{layer} mean of heads'),
                (maps[layer, head], f'L{layer} head {head} ({scores[layer][head]:.2f})'))
      for axis, (image, name) in zip(row[2 * layer:], panels):
        axis.imshow(image, vmin=0, vmax=1, cmap='gray_r')
        axis.set_title(name, fontsize=8)
        axis.set_xticks([])
        axis.set_yticks([])
    row[0].set_ylabel(f'{label}\nquery', fontsize=8)
  figure.suptitle(f'{title}\nkey across, query down; in brackets: the head\'s sink score\n'
                  '(first-token attention of non-trigger queries on Bigram-Backcopy, of all '
                  'queries otherwise)', fontsize=8)
  figure.savefig(path, dpi=120)  # Constrained layout, not _save's tight_layout: the suptitle.
  plt.close(figure)


def eval_figures(result: dict, attention_map: np.ndarray, out_dir: pathlib.Path,
                 title: str) -> None:
  """first_token_attention per layer and per layer x head (and per query type where the data has
  triggers), max_activation per layer, the attention maps (`attention_map_grid`) and the gate
  score histogram, as PNGs named after the step in out_dir."""
  from gated_attention.evaluate import sink_scores  # Not at import: evaluate imports jax.
  prefix = out_dir / f'step_{result["step"]}'
  first_token = result['first_token_attention']
  _per_layer_bars(first_token['per_layer'], 'attention on first token',
                  f'{title}: first-token attention (mean {first_token["mean"]:.3f})',
                  prefix.with_name(prefix.name + '_first_token_attention.png'))

  kinds = [kind for kind in ('per_layer_head', 'trigger', 'non_trigger') if kind in first_token]
  heads = np.asarray(first_token['per_layer_head'])
  figure, axes = plt.subplots(1, len(kinds), squeeze=False, layout='constrained', figsize=(
      (1.5 + 0.4 * heads.shape[1]) * len(kinds) + 1, 2 + 0.4 * heads.shape[0]))
  for axis, kind in zip(axes[0], kinds):
    image = axis.imshow(np.asarray(first_token[kind]), vmin=0, vmax=1, cmap='viridis',
                        aspect='auto')
    axis.set_xticks(range(heads.shape[1]))
    axis.set_yticks(range(heads.shape[0]))
    axis.set_xlabel('head')
    axis.set_ylabel('layer')
    axis.set_title('all queries' if kind == 'per_layer_head'
                   else kind.replace('_', '-') + ' queries', fontsize=9)
  figure.colorbar(image, ax=axes[0].tolist())
  figure.suptitle(f'{title}: first-token attention', fontsize=10)
  figure.savefig(prefix.with_name(prefix.name + '_first_token_attention_heads.png'), dpi=120)
  plt.close(figure)

  attention_map_grid({title: (attention_map, sink_scores(first_token))},
                     prefix.with_name(prefix.name + '_attention_maps.png'), 'attention maps')

  activation = result['max_activation']
  _per_layer_bars(activation['per_layer'], 'max |hidden state|',
                  f'{title}: max activation (mean {activation["mean_of_layer_max"]:.1f})',
                  prefix.with_name(prefix.name + '_max_activation.png'))

  if result.get('gate_score'):
    histogram = result['gate_score']['histogram']
    edges, counts = np.asarray(histogram['edges']), np.asarray(histogram['counts'])
    figure, axis = plt.subplots(figsize=(6, 3.5))
    axis.bar(edges[:-1], counts / max(counts.sum(), 1), width=np.diff(edges), align='edge')
    axis.set_xlabel('gate score')
    axis.set_ylabel('fraction')
    axis.set_title(f'{title}: gate scores (mean {result["gate_score"]["mean"]:.3f})')
    _save(figure, prefix.with_name(prefix.name + '_gate_score_histogram.png'))


def ablation_figures(results: dict, out_dir: pathlib.Path) -> None:
  """loss_curves.png (every run's training loss) and first_token_attention.png (per layer)."""
  _line_plot({name: row['loss_curve'] for name, row in results.items()}, 'step',
             'training loss', 'training loss', out_dir / 'loss_curves.png', log_scale=True)
  _line_plot({name: list(enumerate(row['eval']['first_token_attention']['per_layer']))
              for name, row in results.items() if row.get('eval')},
             'layer', 'attention on first token', 'first-token attention per layer',
             out_dir / 'first_token_attention.png')


def sink_curves(curves: dict, path: pathlib.Path, threshold: float) -> None:
  """sink.png: the most sink-like head's first-token attention (non-trigger queries) against
  the training step, one line per {run: [[step, value], ...]}."""
  _line_plot(curves, 'step', 'first-token attention (non-trigger queries, max head)',
             'attention sink during training', path, threshold=threshold)


def long_eval_figures(result: dict, out_dir: pathlib.Path, title: str) -> None:
  """step_N_loss_by_position.png (held-out loss per position bucket, a line per length, the
  training length marked) and step_N_retrieval.png (accuracy and answer loss against length, a
  line per task)."""
  prefix = f'step_{result["step"]}'
  lengths = sorted(result['lengths'], key=int)
  figure, axis = plt.subplots(figsize=(7, 4.5))
  for length in lengths:
    entry = result['lengths'][length]
    edges = np.asarray(entry['bucket_edges'], dtype=float)
    centres = np.sqrt(np.maximum(edges[:-1], 1) * edges[1:])  # Geometric: the x axis is log.
    axis.plot(centres, entry['bucket_loss'], marker='o', label=f'window {length}')
  axis.axvline(result['train_seq_len'], color='gray', linestyle='--', label='training length')
  axis.set_xscale('log', base=2)
  axis.set_xlabel('position in window')
  axis.set_ylabel('held-out loss')
  axis.legend(fontsize=8)
  axis.set_title(f'{title}: loss by position')
  _save(figure, out_dir / f'{prefix}_loss_by_position.png')

  figure, axes = plt.subplots(1, 2, figsize=(11, 4.5))
  for measure, axis, label in (('accuracy', axes[0], 'accuracy (greedy)'),
                               ('answer_loss', axes[1], 'loss on the answer (teacher forced)')):
    for task in result['lengths'][lengths[0]]['retrieval']:
      values = [result['lengths'][length]['retrieval'][task][measure] for length in lengths]
      axis.plot([int(length) for length in lengths], values, marker='o', label=task)
    axis.axvline(result['train_seq_len'], color='gray', linestyle='--', label='training length')
    axis.set_xscale('log', base=2)
    axis.set_xlabel('context length (tokens)')
    axis.set_ylabel(label)
    axis.legend(fontsize=8)
  axes[0].set_ylim(-0.05, 1.05)
  axes[0].set_title(f'{title}: retrieval')
  _save(figure, out_dir / f'{prefix}_retrieval.png')
