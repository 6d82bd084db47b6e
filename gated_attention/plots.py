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
  axis.set_xlabel('layer')
  axis.set_ylabel(ylabel)
  axis.set_title(title)
  _save(figure, path)


def eval_figures(result: dict, out_dir: pathlib.Path, title: str) -> None:
  """first_token_attention per layer and per layer x head, max_activation per layer, and the gate
  score histogram, as PNGs named after the step in out_dir."""
  prefix = out_dir / f'step_{result["step"]}'
  first_token = result['first_token_attention']
  _per_layer_bars(first_token['per_layer'], 'attention on first token',
                  f'{title}: first-token attention (mean {first_token["mean"]:.3f})',
                  prefix.with_name(prefix.name + '_first_token_attention.png'))

  heads = np.asarray(first_token['per_layer_head'])
  figure, axis = plt.subplots(figsize=(1.5 + 0.4 * heads.shape[1], 1.5 + 0.4 * heads.shape[0]))
  image = axis.imshow(heads, vmin=0, vmax=1, cmap='viridis', aspect='auto')
  axis.set_xlabel('head')
  axis.set_ylabel('layer')
  axis.set_title('first-token attention')
  figure.colorbar(image, ax=axis)
  _save(figure, prefix.with_name(prefix.name + '_first_token_attention_heads.png'))

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
  colors = plt.cm.tab20.colors  # Enough distinct colours for the paper's eleven rows.
  figure, axis = plt.subplots(figsize=(7, 4.5))
  axis.set_prop_cycle(color=colors)
  for name, row in results.items():
    if row['loss_curve']:
      steps, losses = zip(*row['loss_curve'])
      axis.plot(steps, losses, label=name, linewidth=1)
  axis.set_xlabel('step')
  axis.set_ylabel('training loss')
  axis.set_yscale('log')
  axis.legend(fontsize=7)
  axis.set_title('training loss')
  _save(figure, out_dir / 'loss_curves.png')

  figure, axis = plt.subplots(figsize=(7, 4.5))
  axis.set_prop_cycle(color=colors)
  for name, row in results.items():
    if row.get('eval'):
      per_layer = row['eval']['first_token_attention']['per_layer']
      axis.plot(range(len(per_layer)), per_layer, marker='o', label=name, linewidth=1)
      axis.set_xticks(range(len(per_layer)))
  axis.set_xlabel('layer')
  axis.set_ylabel('attention on first token')
  axis.legend(fontsize=7)
  axis.set_title('first-token attention per layer')
  _save(figure, out_dir / 'first_token_attention.png')


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
