"""The model's abstract state, its shardings, and sharded initialisation.

The model is an NNX module used functionally: `abstract_model` splits it once into a graphdef
and abstract variables; parameters travel as a plain nested dict (`nnx.merge(graphdef, params)`
rebuilds the module inside jitted code). Shardings come from each parameter's logical axes.
"""

import functools
import math

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from gated_attention.model import Transformer
from gated_attention.sharding import named_sharding, replicated


def abstract_model(model_config):
  """(graphdef, abstract nnx.State): shapes and metadata only, nothing allocated."""
  return nnx.split(nnx.eval_shape(lambda: Transformer(model_config, rngs=nnx.Rngs(0))))


def flat_param_shapes(abstract_state) -> list[tuple[tuple, tuple[int, ...]]]:
  """[(path, shape)] of every parameter, path a tuple of attribute names and layer indices."""
  return [(path, variable.shape) for path, variable in nnx.to_flat_state(abstract_state)]


def num_params(abstract_state) -> int:
  return sum(math.prod(shape) for _, shape in flat_param_shapes(abstract_state))


def _nested(flat_items) -> dict:
  nested: dict = {}
  for path, value in flat_items:
    node = nested
    for key in path[:-1]:
      node = node.setdefault(key, {})
    node[path[-1]] = value
  return nested


def _stack(*layers):
  return jnp.stack(layers)


def _take(stacked, index: int):
  return stacked[index]


def _stack_abstract(*layers):
  first = layers[0]
  spec = (None, *first.sharding.spec)
  return jax.ShapeDtypeStruct((len(layers), *first.shape), first.dtype,
                              sharding=NamedSharding(first.sharding.mesh, PartitionSpec(*spec)))


def _take_abstract(stacked, index: int):
  del index
  spec = tuple(stacked.sharding.spec)[1:]
  return jax.ShapeDtypeStruct(stacked.shape[1:], stacked.dtype, sharding=NamedSharding(
      stacked.sharding.mesh, PartitionSpec(*spec)))


def convert_layers(tree, scan_layers: bool, stack=_stack, take=_take):
  """Converts every params-shaped dict in `tree` (the parameters, and the optimizer's moments,
  which mirror them) to one layer layout: unrolled {'blocks': {0: block, 1: ...}} or scanned
  {'layers': block with a leading layers axis}. Dicts already in that layout pass unchanged.
  stack(*layers) and take(stacked, i) do the work on the leaves."""
  def convert(node):
    if not isinstance(node, dict):
      return node
    rest = {key: value for key, value in node.items() if key not in ('blocks', 'layers')}
    if scan_layers and 'blocks' in node:
      blocks = node['blocks']
      return {**rest, 'layers': jax.tree.map(stack, *(blocks[i] for i in sorted(blocks, key=int)))}
    if not scan_layers and 'layers' in node:
      layers = node['layers']
      count = jax.tree.leaves(layers)[0].shape[0]
      return {**rest, 'blocks': {i: jax.tree.map(lambda x, i=i: take(x, i), layers)
                                 for i in range(count)}}
    return node

  return jax.tree.map(convert, tree, is_leaf=lambda node: isinstance(node, dict) and (
      'blocks' in node or 'layers' in node))


def in_layout(abstract_tree, scan_layers: bool):
  """`abstract_tree` (ShapeDtypeStructs with NamedShardings) in another layer layout, sharded
  alike: what a checkpoint saved in that layout is restored into."""
  return convert_layers(abstract_tree, scan_layers, _stack_abstract, _take_abstract)


def to_layout(tree, scan_layers: bool, shardings):
  """`tree` converted on device to the layer layout and `shardings` of the running model (a
  checkpoint saved with the other model.scan_layers); unchanged when already there."""
  if jax.tree.structure(tree) == jax.tree.structure(shardings):
    return tree
  return jax.jit(functools.partial(convert_layers, scan_layers=scan_layers),
                 out_shardings=shardings)(tree)


def restore_params(checkpointer, step: int, abstract_params, scan_layers: bool):
  """The parameters of checkpoint `step`, restored in the layer layout they were saved in and
  converted to `scan_layers`, placed as abstract_params' shardings say."""
  saved_layout = checkpointer.saved_config(step)['model']['scan_layers']
  params = checkpointer.restore_params(step, in_layout(abstract_params, saved_layout))
  return to_layout(params, scan_layers, jax.tree.map(lambda a: a.sharding, abstract_params))


def param_shardings(mesh: Mesh, abstract_state) -> dict:
  """NamedSharding per parameter (same nesting as the params dict), checked to divide evenly."""
  return _nested(
      (path, named_sharding(mesh, variable.get_metadata()['logical_axes'], variable.shape,
                            name='/'.join(map(str, path))))
      for path, variable in nnx.to_flat_state(abstract_state))


def init_params(model_config, seed: int, shardings) -> dict:
  """Parameters created directly in their shardings (no full copy on any one device)."""
  def init():
    return nnx.to_pure_dict(nnx.state(Transformer(model_config, rngs=nnx.Rngs(seed))))
  return jax.jit(init, out_shardings=shardings)()


def init_train_state(params: dict, optimizer: optax.GradientTransformation) -> dict:
  """{'step': applied updates so far, 'params', 'opt_state'}."""
  return {'step': jnp.zeros((), jnp.int32), 'params': params,
          'opt_state': optimizer.init(params)}


def train_state_shardings(mesh: Mesh, optimizer, abstract_params: dict, shardings: dict) -> dict:
  """Shardings of init_train_state's output: optimizer moments follow their parameters."""
  abstract_opt_state = jax.eval_shape(optimizer.init, abstract_params)
  opt_shardings = optax.tree_map_params(
      optimizer, lambda _, sharding: sharding, abstract_opt_state, shardings,
      transform_non_params=lambda _: replicated(mesh))
  return {'step': replicated(mesh), 'params': shardings, 'opt_state': opt_shardings}


def with_shardings(abstract_tree, shardings):
  """ShapeDtypeStructs carrying shardings: the inputs for ahead-of-time lowering and restore."""
  return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                      abstract_tree, shardings)
