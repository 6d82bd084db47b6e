"""Evaluation of a checkpoint: held-out loss and perplexity, and the paper's measurements.

  loss, perplexity        over eval.batches held-out batches (the fast attention path);
  first_token_attention   attention probability on the first token (the attention sink), per
                          layer and head, averaged over query positions 1.. and sequences; on
                          the Bigram-Backcopy task also split by query type: `trigger` (queries
                          whose input token is a trigger, where a head must be active) and
                          `non_trigger` (the rest, where a dormant head parks on the first token);
  value_norm              |v| of the first token's value state against the mean of the others',
                          per layer and KV head (a sink's value is small: Guo et al. 2024);
  attention maps          query x key among the first 64 positions, per layer and head, saved as
                          step_<N>_attention_maps.npy [layers, heads, m, m] (and drawn, mean over
                          heads and the most sink-like head, in step_<N>_attention_maps.png);
  max_activation          per layer, the maximum |hidden state| of the residual stream after it;
  gate_score              mean gate score per layer and a histogram (gated models only), both
                          over the gated elements: a headwise or head-shared score counts once
                          for each element it gates.
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

from gated_attention import attention as attention_lib
from gated_attention import bigram_backcopy
from gated_attention import checkpoint as checkpoint_lib
from gated_attention import config as config_lib
from gated_attention import data as data_lib
from gated_attention import sharding as sharding_lib
from gated_attention import state as state_lib
from gated_attention.distributed import log
from gated_attention.model import apply, gate_histogram_edges, measured_positions
from gated_attention.tokenizer import pad_id
from gated_attention.train import check_batch, global_batch


QUERY_KINDS = ('all', 'trigger', 'non_trigger')


def query_triggers(data_config) -> np.ndarray | None:
  """The trigger token ids of the Bigram-Backcopy task when data_config is that task, else None
  (then first-token attention is reported over all queries only)."""
  if data_config.source != 'bigram_backcopy':
    return None
  return bigram_backcopy.chain_of(data_config).triggers


def make_eval_step(graphdef, analysis: bool, pad_id: int | None, triggers=None):
  """eval_step(params, tokens) -> {'loss_sum', 'tokens'} (targets equal to pad_id, if any, not
  counted) plus, with analysis, per-layer stats:
    first_token_attention_sum {kind: [layers, heads]}: attention on the first token summed over
      the queries of each kind in QUERY_KINDS (`all`: queries 1..; query 0 can attend to nothing
      but the first token; given `triggers` (token ids), `trigger`: those whose input token is
      one, `non_trigger`: the others), and query_count {kind: scalar};
    value_norm_first_token [layers, kv_heads]: mean |v| of position 0; value_norm_others_sum
      [layers, kv_heads] and value_norm_count: |v| summed over the real positions 1.., and
      their count;
    attention_map [layers, heads, m, m]: mean over the batch's measured queries of each row,
      attention_map_queries [m] their count;
    max_activation, gate scores (see ModelOutput)."""
  def eval_step(params, tokens):
    output = apply(graphdef, params, tokens[:, :-1], analysis=analysis, targets=tokens[:, 1:],
                   pad_id=pad_id)
    stats = dict(output.stats)
    if analysis:
      inputs = tokens[:, :-1]
      real = measured_positions(inputs, pad_id)
      queries = real.at[:, 0].set(False)
      masks = {'all': queries}
      if triggers is not None:
        is_trigger = jnp.isin(inputs, jnp.asarray(triggers))
        masks.update(trigger=queries & is_trigger, non_trigger=queries & ~is_trigger)
      first_token = stats.pop('first_token_attention')  # [layers, batch, heads, length]
      stats['first_token_attention_sum'] = {
          kind: jnp.einsum('lbht,bt->lh', first_token, mask.astype(first_token.dtype))
          for kind, mask in masks.items()}
      stats['query_count'] = {kind: jnp.sum(mask) for kind, mask in masks.items()}
      value_norm = stats.pop('value_norm')  # [layers, batch, length, kv_heads]
      stats['value_norm_first_token'] = jnp.mean(value_norm[:, :, 0], axis=1)
      stats['value_norm_others_sum'] = jnp.einsum(
          'lbtk,bt->lk', value_norm[:, :, 1:], real[:, 1:].astype(value_norm.dtype))
      stats['value_norm_count'] = jnp.sum(real[:, 1:])
      m = stats['attention_map'].shape[-1]
      stats['attention_map_queries'] = jnp.sum(real[:, :m], axis=0)  # Each map row's queries.
    return {'loss_sum': output.loss_sum, 'tokens': output.num_tokens, **stats}
  return eval_step


def sink_scores(first_token_attention: dict) -> np.ndarray:
  """[layers, heads]: the first-token attention that tells a sink, from a summarized
  first_token_attention: of non-trigger queries where the data has triggers, else of all."""
  kind = 'non_trigger' if 'non_trigger' in first_token_attention else 'per_layer_head'
  return np.asarray(first_token_attention[kind])


def summarize_measurements(per_batch: list[dict], activation: str | None) -> dict:
  """Combines per-batch stats (equal-sized batches) into the paper's measurements:
  first_token_attention {mean, per_layer, per_layer_head: over all queries; trigger, non_trigger
  [layers][heads] where the batches were split by query type}, value_norm {first_token, others
  [layers][kv_heads]}, max_activation, gate_score."""
  sums = {kind: np.sum([b['first_token_attention_sum'][kind] for b in per_batch], axis=0)
          for kind in per_batch[0]['first_token_attention_sum']}
  counts = {kind: np.sum([b['query_count'][kind] for b in per_batch]) for kind in sums}
  by_kind = {kind: sums[kind] / max(counts[kind], 1) for kind in sums}  # [layers, heads]
  first_token = by_kind.pop('all')
  layer_max = np.max([b['max_activation'] for b in per_batch], axis=0)
  result = {
      'first_token_attention': {'mean': float(first_token.mean()),
                                'per_layer': first_token.mean(axis=1).tolist(),
                                'per_layer_head': first_token.tolist(),
                                **{kind: values.tolist() for kind, values in by_kind.items()}},
      'value_norm': {
          'first_token': np.mean([b['value_norm_first_token'] for b in per_batch], 0).tolist(),
          'others': (np.sum([b['value_norm_others_sum'] for b in per_batch], 0)
                     / max(sum(b['value_norm_count'] for b in per_batch), 1)).tolist()},
      'max_activation': {'mean_of_layer_max': float(layer_max.mean()),
                         'per_layer': layer_max.tolist()},
      'gate_score': None,
  }
  if 'gate_score_sum' in per_batch[0]:
    histograms = np.sum([b['gate_score_histogram'] for b in per_batch], axis=0)  # [layers, bins]
    per_layer = (np.sum([b['gate_score_sum'] for b in per_batch], axis=0)
                 / np.maximum(histograms.sum(axis=-1), 1))
    counts = histograms.sum(axis=0)
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
  return graphdef, state_lib.restore_params(checkpointer, step, abstract,
                                            config.model.scan_layers)


def _read_checkpoint(workdir, step: int | None, read):
  """read(checkpointer, step) for checkpoint `step` of the run in workdir, or for the latest
  complete one (even while its run trains on: again with the new latest if it is rotated away
  while read)."""
  checkpointer = checkpoint_lib.Checkpointer(workdir, read_only=True)
  try:
    return (checkpointer.read_latest(lambda at: read(checkpointer, at)) if step is None
            else read(checkpointer, step))
  finally:
    checkpointer.close()


def load_params(workdir, config, mesh, step: int | None = None):
  """(graphdef, params, step): the parameters of checkpoint `step` (default: latest) in
  config's layer layout, placed on `mesh` by the logical-axis rules, whatever mesh and layout
  they were saved in."""
  return _read_checkpoint(workdir, step, lambda checkpointer, at: (
      *_restore_params(checkpointer, config, mesh, at), at))


def restore_run(workdir, step: int | None = None, mesh_config=None, devices=None, *,
                check_eval_batch: bool, batches: int | None = None, check=None):
  """(config, mesh, graphdef, params, step): checkpoint `step` (default: the latest) of the run
  in workdir with the config saved in that step (mesh_config in place of its mesh, over
  `devices`, default all; `batches` in place of eval.batches; with check_eval_batch, the eval
  batch checked against the mesh), its parameters placed on that mesh. check(config), if given,
  runs before they are read (it raises to refuse the run)."""
  def read(checkpointer, at: int):
    config, mesh = _read_config(checkpointer, at, mesh_config, devices, batches,
                                check_eval_batch=check_eval_batch)
    if check is not None:
      check(config)
    return (config, mesh, *_restore_params(checkpointer, config, mesh, at), at)

  return _read_checkpoint(workdir, step, read)


def _read_config(checkpointer, step: int, mesh_config=None, devices=None,
                 batches: int | None = None, analysis_batches: int | None = None, *,
                 check_eval_batch: bool):
  """(config, mesh): the config saved with checkpoint `step`, with the overrides given and an
  attention implementation that runs here."""
  config = ml_collections.ConfigDict(checkpointer.saved_config(step))
  if mesh_config is not None:
    config.mesh = mesh_config
  if batches is not None:
    config.eval.batches = batches
    config.eval.analysis_batches = min(config.eval.analysis_batches, batches)
  if analysis_batches is not None:
    config.eval.analysis_batches = analysis_batches
  impl = attention_lib.runnable_here(config.model.attention_impl)
  if impl != config.model.attention_impl:
    log(f'model.attention_impl={config.model.attention_impl} (as trained) does not run on '
        f'{jax.default_backend()}; attention runs as {impl}, which computes the same.')
    config.model.attention_impl = impl
  config_lib.validate(config)
  mesh = sharding_lib.make_mesh(config.mesh, devices)
  if check_eval_batch:
    check_batch(config, mesh, training=False)
  return config, mesh


class _Evaluator:
  """The held-out batches of a config run through its eval steps, compiled once for every
  checkpoint evaluated with it."""

  def __init__(self, config, mesh, graphdef, params):
    self.config, self.mesh = config, mesh
    self.source = data_lib.load_split(config.data, 'heldout', config.model.vocab_size)
    self.batches = data_lib.heldout_batch_count(self.source, config.eval.batch_size,
                                                config.eval.batches)
    if 0 < self.batches < config.eval.batches:
      log(f'the held-out split holds {self.batches} batch(es) of {config.eval.batch_size}, fewer '
          f'than the {config.eval.batches} asked (eval.batches): evaluating on those.')
    self.batch_sharding = sharding_lib.batch_sharding(mesh)
    self.part = sharding_lib.batch_part(self.batch_sharding, config.eval.batch_size)
    shardings = jax.tree.map(lambda p: p.sharding, params)
    triggers = query_triggers(config.data)
    # Outputs replicated: every process reads them whole, however the mesh spans hosts.
    self.steps = {
        analysis: jax.jit(make_eval_step(graphdef, analysis, pad_id(config.data.tokenizer),
                                         triggers),
                          in_shardings=(shardings, self.batch_sharding),
                          out_shardings=sharding_lib.replicated(mesh))
        for analysis in (False, True)}

  def __call__(self, params, step: int, progress: bool = True) -> dict:
    """The result dict of `evaluate` for these parameters (of checkpoint `step`), and the mean
    attention maps [layers, heads, m, m] under the key 'attention_map' (a NumPy array)."""
    config = self.config
    loss_sum, num_tokens, measured = 0.0, 0, []
    with jax.set_mesh(self.mesh):
      batches = data_lib.heldout_batches(self.source, config.eval.batch_size, self.batches,
                                         *self.part)
      for index, local in enumerate(tqdm(batches, desc='eval', unit='batch', file=sys.stdout,
                                         total=self.batches,
                                         disable=not progress or jax.process_index() != 0)):
        analysis = index < config.eval.analysis_batches
        out = jax.device_get(self.steps[analysis](
            params, global_batch(local, self.batch_sharding, self.part)))
        loss_sum += float(out['loss_sum'])
        num_tokens += int(out['tokens'])
        if analysis:
          measured.append(out)
    loss = loss_sum / num_tokens
    gated = config_lib.canonical_gate_position(config.model.gate.position) != 'none'
    return {'step': step, 'loss': loss, 'perplexity': float(np.exp(loss)), 'tokens': num_tokens,
            'analysis_sequences': len(measured) * config.eval.batch_size,
            **summarize_measurements(measured, config.model.gate.activation if gated else None),
            'attention_map': combine_attention_maps(measured)}


def combine_attention_maps(per_batch: list[dict]) -> np.ndarray:
  """[layers, heads, m, m]: each row of the batches' attention maps averaged over all their
  measured queries (a batch's row weighs by its queries; one with none, all padding, not at
  all)."""
  queries = np.stack([b['attention_map_queries'] for b in per_batch]).astype(np.float64)
  weighted = sum(b['attention_map'] * count[:, None] for b, count in zip(per_batch, queries))
  return (weighted / np.maximum(queries.sum(axis=0), 1)[:, None]).astype(np.float32)


def evaluate(workdir, step: int | None = None, mesh_config=None, batches: int | None = None,
             figures: bool = True) -> dict:
  """Evaluates step `step` (default: the latest complete one, even while its run trains on) of
  the run in workdir, with the config saved in that step; prints the result, then writes
  WORKDIR/eval/step_<N>.json, step_<N>_attention_maps.npy (and PNG figures) and returns the
  JSON's dict."""
  workdir = pathlib.Path(workdir)
  config, mesh, graphdef, params, step = restore_run(workdir, step, mesh_config,
                                                     batches=batches, check_eval_batch=True)
  result = _Evaluator(config, mesh, graphdef, params)(params, step)
  attention_map = result.pop('attention_map')
  first_token = result['first_token_attention']
  split = (f' (non-trigger queries: max head {np.max(first_token["non_trigger"]):.3f})'
           if 'non_trigger' in first_token else '')
  log(f'step {step}: held-out loss {result["loss"]:.4f}, perplexity {result["perplexity"]:.3f} '
      f'over {result["tokens"]:,} tokens; first-token attention {first_token["mean"]:.3f}{split}; '
      f'mean max activation {result["max_activation"]["mean_of_layer_max"]:.1f}'
      + (f'; gate score {result["gate_score"]["mean"]:.3f}' if result['gate_score'] else ''))
  if jax.process_index() == 0:
    out_dir = workdir / 'eval'
    try:
      out_dir.mkdir(exist_ok=True)
      checkpoint_lib.write_whole(out_dir / f'step_{step}.json', json.dumps(result, indent=2))
      np.save(out_dir / f'step_{step}_attention_maps.npy', attention_map)
      if figures:
        from gated_attention import plots  # matplotlib only where figures are drawn.
        plots.eval_figures(result, attention_map, out_dir, title=f'{workdir.name} step {step}')
    except OSError as error:
      raise checkpoint_lib.CheckpointError(
          f'Cannot write the result to {out_dir} ({error.strerror}); it is printed above.'
      ) from None
  return result


def first_token_attention_by_step(workdir, batches: int) -> dict[int, dict]:
  """{step: first_token_attention (as in `evaluate`'s result)} for every checkpoint kept in
  workdir, each measured on the first `batches` held-out batches with one compiled step: how the
  sink forms during training. Prints one progress line per checkpoint."""
  checkpointer = checkpoint_lib.Checkpointer(workdir, read_only=True)
  steps = sorted(checkpointer.manager.all_steps())
  config, mesh = _read_config(checkpointer, steps[-1], batches=batches, analysis_batches=batches,
                              check_eval_batch=True)
  measured, evaluator = {}, None
  for step in steps:
    graphdef, params = _restore_params(checkpointer, config, mesh, step)
    evaluator = evaluator or _Evaluator(config, mesh, graphdef, params)
    measured[step] = evaluator(params, step, progress=False)['first_token_attention']
    log(f'  step {step}: first-token attention, most sink-like head '
        f'{sink_scores(measured[step]).max():.3f}')
  checkpointer.close()
  return measured
