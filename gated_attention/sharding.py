"""Logical axis names, the one table that maps them to mesh axes, and the mesh itself.

Layers name logical axes only (`batch`, `length`, `embed`, `heads`, `kv_heads`, `head_dim`,
`mlp`, `vocab`, `expert`, `layers`, and `lookup_batch` for the embedding lookup's rows);
`LOGICAL_AXIS_RULES` below decides which mesh axis shards
each. The mesh axes are `data` (pure data parallel), `fsdp` (data parallel that also shards
parameters and optimizer state), `tensor` (heads and MLP width) and `expert` (mixture-of-experts
experts; the batch is split over it too, outside the experts).

`kv_heads` is replicated over `tensor` when it does not divide it (say 2 KV heads on
tensor=4): the KV projections are then computed whole on every tensor shard and the keys and
values repeated to the query heads, as MaxText and Megatron do.
"""

import math
from collections.abc import Sequence

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

from gated_attention.config import ConfigError

MESH_AXES = ('data', 'fsdp', 'tensor', 'expert')

# Logical axis -> mesh axes it may use. A mesh axis already taken by an earlier dimension of the
# same array is skipped, so activations' `embed` stays whole when `batch` already uses `fsdp`.
LOGICAL_AXIS_RULES: dict[str, tuple[str, ...]] = {
    'expert': ('expert',),
    'batch': ('data', 'fsdp', 'expert'),
    'lookup_batch': ('data', 'expert'),  # The embedding lookup's rows: its columns take fsdp.
    'vocab': ('tensor',),
    'heads': ('tensor',),
    'kv_heads': ('tensor',),
    'mlp': ('tensor',),
    'embed': ('fsdp',),
    'length': (),
    'head_dim': (),
    'layers': (),  # The stacked layer axis of scanned blocks (model.scan_layers).
}
# Logical axes that fall back to replication on a mesh axis they do not divide.
REPLICATED_WHEN_INDIVISIBLE = ('kv_heads',)

LogicalAxes = tuple[str | None, ...]


def logical_to_spec(logical_axes: LogicalAxes, shape=None, mesh=None) -> PartitionSpec:
  """Maps logical axis names to a PartitionSpec through `LOGICAL_AXIS_RULES`. With `shape`, a
  dimension in REPLICATED_WHEN_INDIVISIBLE stays whole where its mesh axes do not divide it
  (mesh: the given one, else the current abstract mesh)."""
  mesh = jax.sharding.get_abstract_mesh() if mesh is None else mesh
  used: set[str] = set()
  spec = []
  for index, name in enumerate(logical_axes):
    if name is not None and name not in LOGICAL_AXIS_RULES:
      raise ValueError(f'Unknown logical axis {name!r}; known: {sorted(LOGICAL_AXIS_RULES)}.')
    mesh_axes = () if name is None else tuple(
        axis for axis in LOGICAL_AXIS_RULES[name] if axis not in used)
    if (shape is not None and name in REPLICATED_WHEN_INDIVISIBLE and not mesh.empty
        and shape[index] % math.prod(mesh.shape[axis] for axis in mesh_axes)):
      mesh_axes = ()
    used.update(mesh_axes)
    spec.append(mesh_axes[0] if len(mesh_axes) == 1 else (mesh_axes or None))
  return PartitionSpec(*spec)


def splits_evenly(logical_axis: str, size: int) -> bool:
  """Whether a dimension of `size` is sharded, not replicated, on the current mesh's axes for
  `logical_axis` (True outside a mesh context)."""
  return logical_to_spec((logical_axis,), (size,)) == logical_to_spec((logical_axis,))


def constrain(x: jax.Array, logical_axes: LogicalAxes) -> jax.Array:
  """Sharding constraint by logical axes; a no-op outside a mesh context (tests, analysis)."""
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty:
    return x
  return jax.lax.with_sharding_constraint(x, logical_to_spec(logical_axes, x.shape, mesh))


def target_platform() -> str:
  """The platform being compiled for: that of the current mesh's devices (so compiling for a
  TPU topology on a CPU host says 'tpu'), else the default backend. Works inside jit."""
  device = getattr(jax.sharding.get_abstract_mesh(), 'abstract_device', None)
  return jax.default_backend() if device is None else device.platform


def mesh_shape(mesh_config, num_devices: int) -> tuple[int, ...]:
  """Returns (data, fsdp, tensor, expert) with the one -1 filled so the product is num_devices."""
  sizes = [int(mesh_config.get(axis, 1)) for axis in MESH_AXES]
  described = ', '.join(f'mesh.{a}={s}' for a, s in zip(MESH_AXES, sizes))
  if sizes.count(-1) > 1 or any(s == 0 or s < -1 for s in sizes):
    raise ConfigError(f'{described}: each size must be a positive integer, with at most one -1 '
                      '(mesh.data is -1 by default: give it a size, e.g. mesh.data=1, when '
                      'another axis takes the remaining devices).')
  known = math.prod(s for s in sizes if s != -1)
  if -1 in sizes:
    if num_devices % known:
      raise ConfigError(f'{described}: {num_devices} devices cannot be split with the given sizes '
                       f'(their product {known} must divide the device count).')
    sizes[sizes.index(-1)] = num_devices // known
  if math.prod(sizes) != num_devices:
    raise ConfigError(f'{described}: the product {math.prod(sizes)} must equal the device count '
                     f'{num_devices} (set one axis to -1 to fill it in).')
  return tuple(sizes)


def make_mesh(mesh_config, devices: Sequence[jax.Device] | None = None) -> Mesh:
  """Builds the (data, fsdp, tensor, expert) mesh from `config.mesh` over `devices` (default:
  all)."""
  devices = list(jax.devices() if devices is None else devices)
  shape = mesh_shape(mesh_config, len(devices))
  return Mesh(np.asarray(devices).reshape(shape), MESH_AXES,
              axis_types=(AxisType.Auto,) * len(MESH_AXES))


def named_sharding(mesh: Mesh, logical_axes: LogicalAxes, shape=None,
                   name: str = '') -> NamedSharding:
  """NamedSharding for logical axes; with `shape`, checks every sharded dimension divides evenly
  (or, for REPLICATED_WHEN_INDIVISIBLE axes, replicates it)."""
  spec = logical_to_spec(logical_axes, shape, mesh)
  if shape is not None:
    for size, axes, logical in zip(shape, spec, logical_axes):
      axes = (axes,) if isinstance(axes, str) else (axes or ())
      ways = math.prod(mesh.shape[a] for a in axes)
      if size % ways:
        raise ConfigError(
            f'{name or "array"} dimension {logical!r} of size {size} cannot be split {ways} ways '
            f'over mesh axes {axes}; choose config.mesh sizes that divide it.')
  return NamedSharding(mesh, spec)


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """How batches of token ids [batch, length] lie on the mesh."""
  return named_sharding(mesh, ('batch', 'length'))


def batch_part(batch_sharding: NamedSharding, batch_size: int) -> tuple[int, int]:
  """(part, parts): the rows of every global batch of `batch_size` this process's devices hold,
  as part `part` of `parts` equal consecutive blocks. Processes whose devices share batch rows
  (a tensor axis wider than a host) read the same part. ConfigError when the mesh gives this
  process rows no such block describes."""
  rows = set()
  for index in batch_sharding.addressable_devices_indices_map((batch_size, 1)).values():
    rows.update(range(*index[0].indices(batch_size)))
  start, count = min(rows), len(rows)
  if rows != set(range(start, start + count)) or batch_size % count or start % count:
    raise ConfigError(
        f'config.mesh {dict(batch_sharding.mesh.shape)} gives process {jax.process_index()} '
        f'batch rows that are not one of equal consecutive blocks of the {batch_size} rows: '
        'choose mesh sizes whose batch axes (data x fsdp x expert) give each host consecutive '
        'rows: hosts along data or fsdp, mesh.tensor within one host or across whole groups.')
  return start // count, batch_size // count


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, PartitionSpec())
