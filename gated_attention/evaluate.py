"""Evaluation of a checkpoint: held-out loss and perplexity, and the paper's measurements.

  loss, perplexity        over eval.batches held-out batches (the fast attention path);
  first_token_attention   attention probability on the first token (the attention sink), per
                          layer and head, averaged over query positions 1.. and sequences;
  max_activation          per layer, the maximum |hidden state| of the residual stream after it;
  gate_score              mean gate score per layer and a histogram (gated models only).
The measurements use the `xla` attention path on the first eval.analysis_batches batches; the
training path is untouched.
"""

import json
import pathlib
import sys

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx
from tqdm import tqdm

from gated_attention import checkpoint as checkpoint_lib
from gated_attention import config as config_lib
from gated_attention import data as data_lib
from gated_attention import sharding as sharding_lib
from gated_attention import state as state_lib
from gated_attention.model import apply, gate_histogram_edges
from gated_attention.tokenizer import pad_id
from gated_attention.train import check_batch, cross_entropy, global_batch, log


def make_eval_step(graphdef, analysis: bool, pad_id: int | None):
  """eval_step(params, tokens) -> {'loss_sum', 'tokens'} (targets equal to pad_id, if any, not
  counted) plus, with analysis, per-layer stats:
  first_token_attention [layers, heads] (mean over sequences and queries 1..: query 0 can
  attend to nothing but the first token), max_activation, gate scores."""
  def eval_step(params, tokens):
    output = apply(graphdef, params, tokens[:, :-1], analysis=analysis)
    loss_sum, num_tokens = cross_entropy(output.logits, tokens[:, 1:], pad_id)
    stats = dict(output.stats)
    if analysis:
      stats['first_token_attention'] = jnp.mean(stats['first_token_attention'][..., 1:],
                                                 axis=(1, 3))
      del stats['attention_map'], stats['value_norm']
    return {'loss_sum': loss_sum, 'tokens': num_tokens, **stats}
  return eval_step


def summarize_measurements(per_batch: list[dict], activation: str | None) -> dict:
  """Combines per-batch stats (equal-sized batches) into the paper's measurements."""
  first_token = np.mean([b['first_token_attention'] for b in per_batch], axis=0)  # [layers, heads]
  layer_max = np.max([b['max_activation'] for b in per_batch], axis=0)
  result = {
      'first_token_attention': {'mean': float(first_token.mean()),
                                'per_layer': first_token.mean(axis=1).tolist(),
                                'per_layer_head': first_token.tolist()},
      'max_activation': {'mean_of_layer_max': float(layer_max.mean()),
                         'per_layer': layer_max.tolist()},
      'gate_score': None,
  }
  if 'gate_score_mean' in per_batch[0]:
    per_layer = np.mean([b['gate_score_mean'] for b in per_batch], axis=0)
    counts = np.sum([b['gate_score_histogram'] for b in per_batch], axis=(0, 1))
    result['gate_score'] = {
        'mean': float(per_layer.mean()), 'per_layer': per_layer.tolist(),
        'histogram': {'edges': gate_histogram_edges(activation).tolist(),
                      'counts': counts.astype(int).tolist()}}
  return result


def _restore_params(checkpointer, config, mesh, step: int):
  """(graphdef, params) of checkpoint `step`, placed on `mesh` by the logical-axis rules, in
  config's layer layout whichever one the checkpoint was saved in."""
  graphdef, abstract_variables = state_lib.abstract_model(config.model)
  shardings = state_lib.param_shardings(mesh, abstract_variables)
  abstract = state_lib.with_shardings(nnx.to_pure_dict(abstract_variables), shardings)
  saved_layout = checkpointer.saved_config(step)['model']['scan_layers']
  params = checkpointer.restore_params(step, state_lib.in_layout(abstract, saved_layout))
  return graphdef, state_lib.to_layout(params, config.model.scan_layers, shardings)


def load_params(workdir, config, mesh, step: int | None = None):
  """(graphdef, params, step): the parameters of checkpoint `step` (default: latest) placed on
  `mesh` by the logical-axis rules, whatever mesh they were saved from."""
  checkpointer = checkpoint_lib.Checkpointer(workdir, read_only=True)
  read = lambda at: (*_restore_params(checkpointer, config, mesh, at), at)
  graphdef, params, step = checkpointer.read_latest(read) if step is None else read(step)
  checkpointer.close()
  return graphdef, params, step


def evaluate(workdir, step: int | None = None, mesh_config=None, batches: int | None = None,
             figures: bool = True) -> dict:
  """Evaluates step `step` (default: the latest complete one, even while its run trains on) of
  the run in workdir, with the config saved in that step; prints the result, then writes
  WORKDIR/eval/step_<N>.json (and PNG figures) and returns the same dict."""
  workdir = pathlib.Path(workdir)
  checkpointer = checkpoint_lib.Checkpointer(workdir, read_only=True)

  def read(at: int):
    config = ml_collections.ConfigDict(checkpointer.saved_config(at))
    if mesh_config is not None:
      config.mesh = mesh_config
    if batches is not None:
      config.eval.batches = batches
    config_lib.validate(config)
    mesh = sharding_lib.make_mesh(config.mesh)
    check_batch(config, mesh)
    return (config, mesh, *_restore_params(checkpointer, config, mesh, at), at)

  config, mesh, graphdef, params, step = (
      checkpointer.read_latest(read) if step is None else read(step))
  checkpointer.close()
  shardings = jax.tree.map(lambda p: p.sharding, params)

  source = data_lib.load_split(config.data, 'heldout', config.model.vocab_size)
  batch_sharding = sharding_lib.named_sharding(mesh, ('batch', 'length'))
  steps = {analysis: jax.jit(make_eval_step(graphdef, analysis, pad_id(config.data.tokenizer)),
                             in_shardings=(shardings, batch_sharding))
           for analysis in (False, True)}
  loss_sum, num_tokens, measured = 0.0, 0, []
  with jax.set_mesh(mesh):
    batches = data_lib.heldout_batches(source, config.eval.batch_size, config.eval.batches,
                                       jax.process_index(), jax.process_count())
    for index, local in enumerate(tqdm(batches, desc='eval', unit='batch', file=sys.stdout,
                                       total=config.eval.batches,
                                       disable=jax.process_index() != 0)):
      analysis = index < config.eval.analysis_batches
      out = jax.device_get(steps[analysis](params, global_batch(local, batch_sharding)))
      loss_sum += float(out['loss_sum'])
      num_tokens += int(out['tokens'])
      if analysis:
        measured.append(out)

  loss = loss_sum / num_tokens
  gated = config_lib.canonical_gate_position(config.model.gate.position) != 'none'
  result = {'step': step, 'loss': loss, 'perplexity': float(np.exp(loss)), 'tokens': num_tokens,
            'analysis_sequences': len(measured) * config.eval.batch_size,
            **summarize_measurements(measured, config.model.gate.activation if gated else None)}
  log(f'step {step}: held-out loss {loss:.4f}, perplexity {result["perplexity"]:.3f} over '
      f'{num_tokens:,} tokens; first-token attention '
      f'{result["first_token_attention"]["mean"]:.3f}; '
      f'mean max activation {result["max_activation"]["mean_of_layer_max"]:.1f}'
      + (f'; gate score {result["gate_score"]["mean"]:.3f}' if result['gate_score'] else ''))
  if jax.process_index() == 0:
    out_dir = workdir / 'eval'
    try:
      out_dir.mkdir(exist_ok=True)
      (out_dir / f'step_{step}.json').write_text(json.dumps(result, indent=2))
      if figures:
        from gated_attention import plots  # matplotlib only where figures are drawn.
        plots.eval_figures(result, out_dir, title=f'{workdir.name} step {step}')
    except OSError as error:
      raise checkpoint_lib.CheckpointError(
          f'Cannot write the result to {out_dir} ({error.strerror}); it is printed above.'
      ) from None
  return result
