"""Continued training from another run: `train.init_from=DIR[:STEP]`.

A new run (a workdir without checkpoints) starts from the parameters of checkpoint STEP
(default: the latest) of the run or imported model in DIR, with its own config: another
seq_len, rope_theta, rope_scaling, schedule or data, or an added gate (the paper's appendix A.7
and the context-extension recipe of its Table 5). Parameters are matched by their path in the
unrolled layer layout, so either model.scan_layers reads either:

  loaded        present in both with the same shape (cast to this run's param_dtype);
  gate columns  a projection that carries a fused gate (gate.py: [head tensor | head gate] per
                head on the last axis) on one side only, gates of different widths, or gates
                at different positions (G1 and G4 both in wq): the head_dim columns shared by
                both are loaded, this run's gate columns keep their fresh initialisation, the
                source's are dropped (a gate removed: the projection is loaded, its source's
                gate columns dropped);
  initialised   only in this run (a G5 gate kernel, an input-independent gate's score);
  dropped       only in the source.
Any other shape change (d_model, head_dim, vocabulary, MLP width) is one ConfigError naming the
parameter, both shapes and the model keys that differ, and another depth one naming
model.num_layers, before anything is compiled.
The optimizer starts fresh, unless train.init_from_optimizer asks for the source's moments
(then every parameter must be loaded whole).
"""

import dataclasses
import pathlib

import jax
import jax.numpy as jnp
import ml_collections
import optax
from flax import nnx

from gated_attention import checkpoint as checkpoint_lib
from gated_attention import resume as resume_lib
from gated_attention import state as state_lib
from gated_attention import tokenizer as tokenizer_lib
from gated_attention.config import ConfigError, canonical_gate_position
from gated_attention.distributed import warn

# The projections whose kernel may carry a fused gate on its last axis (gate.Gate.fused_into).
FUSED_KERNELS = ('wq', 'wk', 'wv')


def parse(spec: str) -> tuple[pathlib.Path, int | None]:
  """(directory, step or None for the latest) of 'DIR' or 'DIR:STEP'."""
  directory, colon, step = spec.rpartition(':')
  if colon and step.isdigit():
    return pathlib.Path(directory), int(step)
  return pathlib.Path(spec), None


@dataclasses.dataclass
class Plan:
  """What each parameter of this run takes from the source, by unrolled path."""
  directory: pathlib.Path
  step: int
  source_config: dict
  loaded: list
  gate_columns: list  # (path, shared head_dim columns, source width, this run's width)
  initialised: list
  dropped: list

  @property
  def whole(self) -> bool:
    """Every parameter loaded whole, none dropped: the source's optimizer state fits."""
    return not (self.gate_columns or self.initialised or self.dropped)

  def record(self) -> dict:
    """The plan for WORKDIR/history.jsonl: the source and the parameter names of each kind."""
    return {'directory': str(self.directory.absolute()), 'step': self.step,
            'loaded': len(self.loaded), **{key.replace(' ', '_'): names(paths)
                                           for key, paths in self._partly_loaded().items()},
            'initialised': names(self.initialised), 'dropped': names(self.dropped)}

  def _partly_loaded(self) -> dict[str, list]:
    """The projections of gate_columns: whose own gate columns are initialised, and whose
    source's gate columns are dropped (a projection can be both)."""
    return {'gate columns initialised': [path for path, shared, _, width in self.gate_columns
                                         if width > shared],
            'source gate columns dropped': [path for path, shared, width, _ in self.gate_columns
                                            if width > shared]}

  def describe(self) -> str:
    """One log line."""
    partly = self._partly_loaded()
    loaded = len(self.loaded) + len(self.gate_columns) - len(partly['gate columns initialised'])
    total = len(self.loaded) + len(self.gate_columns) + len(self.initialised)
    parts = [f'initialising from {self.directory} step {self.step}: {loaded} of {total} '
             'parameters loaded']
    for label, paths in (*partly.items(), ('initialised', self.initialised),
                         ('dropped', self.dropped)):
      if paths:
        parts.append(f'{label}: {", ".join(names(paths))}')
    return '; '.join(parts)


def names(paths) -> list[str]:
  """Readable parameter names, one per kind of block parameter: blocks/*/attention/wq."""
  seen = {}
  for path in paths:
    name = '/'.join('*' if path[0] == 'blocks' and i == 1 else str(key)
                    for i, key in enumerate(path))
    seen.setdefault(name, None)
  return list(seen)


def _unrolled_abstract(model_config) -> nnx.State:
  """The abstract parameters of a model config in the unrolled layer layout."""
  unrolled = ml_collections.ConfigDict(model_config.to_dict())
  unrolled.scan_layers = False
  return state_lib.abstract_model(unrolled)[1]


def _unrolled_shapes(model_config) -> dict:
  """{path in the unrolled layout: shape} of every parameter of a model config."""
  return {tuple(path): variable.shape
          for path, variable in nnx.to_flat_state(_unrolled_abstract(model_config))}


def make_plan(config, directory: pathlib.Path, step: int, source_config: dict) -> Plan:
  """Matches this run's parameters with the source's; ConfigError for a changed shape."""
  source_model = ml_collections.ConfigDict(source_config['model'])
  if source_model.get('norm_plus_one', False) != config.model.norm_plus_one:
    raise ConfigError(
        f'train.init_from={config.train.init_from!r}: {directory} step {step} has '
        f'model.norm_plus_one={source_model.get("norm_plus_one", False)}, this config '
        f'{config.model.norm_plus_one}: its norm scales w (scale 1 + w) would be read as scales '
        '(or the reverse), changing the model. Set model.norm_plus_one to the source\'s.')
  if source_model.num_layers != config.model.num_layers:
    raise ConfigError(
        f'train.init_from={config.train.init_from!r}: {directory} step {step} has '
        f'model.num_layers={source_model.num_layers}, this config {config.model.num_layers}: '
        'layers are loaded one for one; keep the source\'s depth.')
  source_tokenizer = source_config['data']['tokenizer']
  same = tokenizer_lib.same_ids(source_tokenizer, config.data.tokenizer)
  if same is None:
    warn(f'train.init_from: {directory} step {step} was trained with data.tokenizer='
        f'{source_tokenizer!r}, which cannot be read to compare with {config.data.tokenizer!r}: '
        'its embedding rows are taken to stand for the same tokens.')
  if source_tokenizer != tokenizer_lib.NONE and same is False:
    raise ConfigError(
        f'train.init_from={config.train.init_from!r}: {directory} step {step} was trained with '
        f'data.tokenizer={source_tokenizer!r}, this config reads {config.data.tokenizer!r}: '
        'its embedding rows would stand for other tokens. Keep the source\'s tokenizer (or '
        'one with the same vocabulary).')
  source, target = _unrolled_shapes(source_model), _unrolled_shapes(config.model)
  head_dim = config.model.head_dim
  # A gate that moved (G1 to G4 both live in wq's columns) gates another tensor: its columns are
  # not carried over even where the shapes agree.
  gate_moved = (canonical_gate_position(source_model.gate.position)
                != canonical_gate_position(config.model.gate.position))
  plan = Plan(directory, step, source_config, [], [], [],
              [path for path in source if path not in target])
  for path, shape in target.items():
    if path not in source:
      plan.initialised.append(path)
    elif source[path] == shape and not (gate_moved and path[-1] in FUSED_KERNELS
                                        and shape[-1] > head_dim):
      plan.loaded.append(path)
    elif (path[-1] in FUSED_KERNELS and source[path][:-1] == shape[:-1]
          and source_model.head_dim == head_dim and min(source[path][-1], shape[-1]) >= head_dim):
      plan.gate_columns.append((path, head_dim, source[path][-1], shape[-1]))
    else:
      changed = {key: values for key, values in resume_lib.differences(
          source_config, resume_lib.plain(config)).items()
                 if resume_lib.policy(key) == resume_lib.MODEL}
      raise ConfigError(
          f'train.init_from={config.train.init_from!r}: parameter {"/".join(map(str, path))} '
          f'has shape {list(source[path])} in {directory} step {step} but {list(shape)} in this '
          f'config (model keys that differ: {resume_lib.describe(changed) or "none"}). Only '
          'parameters of unchanged shape, and the shared columns of a projection with a fused '
          'gate, carry over: keep the shape-setting model keys of the source.')
  return plan


def _flat(tree) -> dict:
  return {tuple(key.key for key in path): leaf
          for path, leaf in jax.tree_util.tree_leaves_with_path(tree)}


def _nested_like(flat: dict, like):
  return jax.tree_util.tree_map_with_path(
      lambda path, _: flat[tuple(key.key for key in path)], like)


def _unrolled_shardings(mesh, model_config):
  return state_lib.param_shardings(mesh, _unrolled_abstract(model_config))


def _open_source(config) -> tuple[checkpoint_lib.Checkpointer, pathlib.Path, int]:
  """(read-only checkpointer, directory, step) of train.init_from; ConfigError if it holds no
  such checkpoint."""
  directory, step = parse(config.train.init_from)
  if not (directory / 'checkpoints').is_dir():
    run, colon, tail = config.train.init_from.rpartition(':')
    if colon and (pathlib.Path(run) / 'checkpoints').is_dir():
      raise ConfigError(f'train.init_from={config.train.init_from!r}: {tail!r} is not a step '
                        'number; give DIR or DIR:STEP with STEP an integer.')
    raise ConfigError(f'train.init_from={config.train.init_from!r}: {directory} holds no '
                      'checkpoints/ directory; name a run or an imported model (DIR or DIR:STEP).')
  reader = checkpoint_lib.Checkpointer(directory, read_only=True)
  steps = list(reader.manager.all_steps())
  if step is None and not steps:
    reader.close()
    raise ConfigError(f'train.init_from={config.train.init_from!r}: no complete checkpoint in '
                      f'{reader.directory}.')
  if step is not None and step not in steps:
    reader.close()
    raise ConfigError(f'train.init_from={config.train.init_from!r}: {reader.directory} holds no '
                      f'complete checkpoint of step {step} (complete steps: {steps}).')
  return reader, directory, reader.latest_step() if step is None else step


def load_plan(config) -> Plan:
  """The plan for train.init_from, from the source's saved config alone (no array is read)."""
  reader, directory, step = _open_source(config)
  try:
    return make_plan(config, directory, step, reader.saved_config(step))
  finally:
    reader.close()


def initial_params(config, plan: Plan, mesh, param_shardings, fresh_params) -> dict:
  """Parameters in this run's layout and shardings: the source's where the plan loads them,
  `fresh_params` (this run's initialisation) elsewhere."""
  source_model = ml_collections.ConfigDict(plan.source_config['model'])
  _, source_abstract = state_lib.abstract_model(source_model)
  abstract = state_lib.with_shardings(nnx.to_pure_dict(source_abstract),
                                      state_lib.param_shardings(mesh, source_abstract))
  reader = checkpoint_lib.Checkpointer(plan.directory, read_only=True)
  try:
    source = reader.restore_params(plan.step, abstract)
  finally:
    reader.close()
  source = _flat(state_lib.to_layout(source, False, _unrolled_shardings(mesh, source_model)))
  unrolled_shardings = _unrolled_shardings(mesh, config.model)
  merged = _flat(state_lib.to_layout(fresh_params, False, unrolled_shardings))
  for path in plan.loaded:
    merged[path] = source[path].astype(merged[path].dtype)
  for path, shared, _, _ in plan.gate_columns:
    merged[path] = merged[path].at[..., :shared].set(
        source[path][..., :shared].astype(merged[path].dtype))
  merged = _nested_like(merged, unrolled_shardings)
  return state_lib.to_layout(merged, config.model.scan_layers, param_shardings)


def source_train_state(config, setup, plan: Plan) -> dict:
  """The source's whole train state (parameters and optimizer moments) in this run's layout, its
  step and learning-rate schedule counters reset to 0: train.init_from_optimizer."""
  if not plan.whole:
    raise ConfigError(
        'train.init_from_optimizer=True needs every parameter loaded whole; '
        f'{plan.describe()}. Set train.init_from_optimizer=False for a fresh optimizer.')
  reader = checkpoint_lib.Checkpointer(plan.directory, read_only=True)
  try:
    if reader.holds_params_only(plan.step):
      raise ConfigError(f'train.init_from_optimizer=True: {plan.directory} step {plan.step} '
                        'holds parameters only (an imported model); it has no optimizer state.')
    source_layout = plan.source_config['model']['scan_layers']
    state, _ = reader.restore(plan.step, state_lib.in_layout(setup.abstract_state,
                                                             source_layout))
  finally:
    reader.close()
  state = state_lib.to_layout(state, config.model.scan_layers, setup.state_shardings)
  # The new run's schedule starts at its step 0; Adam's moments and their count carry over.
  is_schedule = lambda node: isinstance(node, optax.ScaleByScheduleState)
  opt_state = jax.tree.map(
      lambda node: node._replace(count=jnp.zeros_like(node.count)) if is_schedule(node) else node,
      state['opt_state'], is_leaf=is_schedule)
  return {**state, 'step': jnp.zeros_like(state['step']), 'opt_state': opt_state}
