"""Orbax checkpoints: one manager per run. Each step holds four items:

  state      the train state (step, parameters, optimizer state);
  host       the data iterator's position and the loop's counters (JSON);
  config     the full config the step was trained with (JSON), so a resume or an evaluation
             knows the model whatever became of WORKDIR/config.json;
  checksums  per array of `state`, a checksum of its bits computed on device at save time (JSON).

A restore recomputes the checksums and refuses an array whose bits changed, or one holding
non-finite values: such a checkpoint is damaged. WORKDIR/config.json holds the latest run's
config for people and tools.

Orbax writes each step into a temporary directory and renames it when complete, so a run killed
mid-save leaves no directory that `latest_step` would take as whole; a step past
train.keep_checkpoints is renamed into checkpoints/deleting before it is removed, so a run
killed mid-removal leaves its remains there, not in a step directory. A failed asynchronous save
is raised by `raise_if_save_failed` (and by the next save or `wait`), naming the last good step.
"""

import contextlib
import json
import math
import pathlib
import shutil

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import orbax.checkpoint as ocp

from gated_attention import config as config_lib

ITEMS = ('state', 'host', 'config', 'checksums')
DELETING = 'deleting'  # Under checkpoints/: old steps, renamed away whole, then removed.
READ_ATTEMPTS = 5


class CheckpointError(RuntimeError):
  """A checkpoint or workdir that cannot be used; the message names the path."""


class CheckpointVanished(CheckpointError):
  """A complete checkpoint that was removed while it was read (its trainer rotated it away)."""


def config_path(workdir) -> pathlib.Path:
  return pathlib.Path(workdir) / 'config.json'


@contextlib.contextmanager
def whole_file(path: pathlib.Path):
  """Yields a temporary path beside `path` to write; renames it over `path` once the block
  ends without an error, so a reader or a killed writer never meets a half-written file."""
  temporary = path.with_name(path.name + '.tmp')
  yield temporary
  temporary.rename(path)


def write_whole(path: pathlib.Path, text: str) -> None:
  """Writes a text file whole or not at all (`whole_file`)."""
  with whole_file(path) as temporary:
    temporary.write_text(text)


def save_config(workdir, config: ml_collections.ConfigDict) -> None:
  """Writes WORKDIR/config.json whole."""
  write_whole(config_path(workdir), config.to_json(indent=2))


def load_config(workdir) -> ml_collections.ConfigDict:
  path = config_path(workdir)
  try:
    saved = json.loads(path.read_text())
    if not isinstance(saved, dict) or not isinstance(saved.get('model'), dict):
      raise CheckpointError(f'{path} is not a run\'s config (it has no "model" block): is '
                            f'{workdir} a training workdir?')
    return ml_collections.ConfigDict(config_lib.upgrade(saved))
  except FileNotFoundError:
    raise CheckpointError(f'{path} does not exist: is {workdir} a training workdir?') from None
  except json.JSONDecodeError as error:
    raise CheckpointError(f'{path} is not valid JSON ({error}).') from None


def _bits(x: jax.Array) -> jax.Array:
  """The bits of each element as uint32 (zero-extended for narrower types)."""
  if x.dtype == jnp.bool_:
    return x.astype(jnp.uint32)
  unsigned = jnp.dtype(f'uint{8 * x.dtype.itemsize}')
  return jax.lax.bitcast_convert_type(x, unsigned).astype(jnp.uint32)


def _flat_index(shape) -> jax.Array:
  """uint32 [*shape]: each element's row-major flat index, modulo 2**32."""
  strides = [math.prod(shape[d + 1:]) % 2**32 for d in range(len(shape))]
  index = jnp.zeros(shape, jnp.uint32)
  for dim, stride in enumerate(strides):
    index += jax.lax.broadcasted_iota(jnp.uint32, shape, dim) * jnp.uint32(stride)
  return index


def _checksum(x: jax.Array) -> jax.Array:
  weight = (_flat_index(x.shape) * jnp.uint32(0x9E3779B1)) | jnp.uint32(1)
  return jnp.sum(_bits(x) * weight, dtype=jnp.uint32)


def _finite(x: jax.Array) -> jax.Array:
  return jnp.all(jnp.isfinite(x)) if jnp.issubdtype(x.dtype, jnp.inexact) else jnp.asarray(True)


@jax.jit
def fingerprints(tree):
  """(checksums, finite): trees like `tree` of uint32 and bool scalars. A checksum sums each
  element's bits times an odd weight of its flat index, modulo 2**32: exact integer arithmetic,
  so the same for any sharding, device or process count, and changed by any change to one
  element."""
  return jax.tree.map(_checksum, tree), jax.tree.map(_finite, tree)


def _key(path) -> str:
  """'params/embedding': an array's key in checksums and in the saved state's metadata."""
  return jax.tree_util.keystr(path, simple=True, separator='/')


def checksums(tree) -> dict[str, tuple[int, bool]]:
  """{'params/embedding': (checksum, all finite), ...} for every array of `tree`."""
  sums, finite = jax.device_get(fingerprints(tree))
  keys = [_key(path) for path, _ in jax.tree_util.tree_flatten_with_path(sums)[0]]
  return {key: (int(checksum), bool(ok))
          for key, checksum, ok in zip(keys, jax.tree.leaves(sums), jax.tree.leaves(finite))}


def _cast_like(tree, abstract_tree):
  return jax.tree.map(lambda x, a: x if x.dtype == a.dtype else x.astype(a.dtype), tree,
                      abstract_tree)


class Checkpointer:
  """Saves and restores train state, host state, config and checksums by step."""

  def __init__(self, workdir, keep: int | None = None, read_only: bool = False):
    """read_only: for evaluation; the directory must exist and nothing is written."""
    self.directory = pathlib.Path(workdir).absolute() / 'checkpoints'
    options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=not read_only,
                                           enable_async_checkpointing=True,
                                           todelete_subdir=DELETING)
    self.manager = ocp.CheckpointManager(self.directory, options=options, item_names=ITEMS)
    self.saving_step: int | None = None
    self.read_only = read_only

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def save(self, step: int, state, host_state: dict, config: ml_collections.ConfigDict) -> None:
    """Starts an asynchronous save; arrays are copied and checksummed before this returns.
    Raises CheckpointError if this save cannot start or the previous one failed."""
    self.wait()
    self._remove_deleted()
    self.saving_step = step
    sums = {key: checksum for key, (checksum, _) in checksums(state).items()}
    try:
      self.manager.save(step, args=ocp.args.Composite(
          state=ocp.args.StandardSave(state), host=ocp.args.JsonSave(host_state),
          config=ocp.args.JsonSave(json.loads(config.to_json())),
          checksums=ocp.args.JsonSave(sums)), force=True)
    except Exception as error:  # Orbax raises many types for a directory it cannot write.
      raise self._save_failed(error) from None

  def raise_if_save_failed(self) -> None:
    """Raises CheckpointError if the last asynchronous save has failed; never blocks on one
    still running."""
    if not self.manager.is_saving_in_progress():
      self.wait()

  def wait(self) -> None:
    """Blocks until the last asynchronous save is complete on disk; CheckpointError if it failed."""
    try:
      self.manager.wait_until_finished()
    except Exception as error:  # The background save's own error, re-raised.
      raise self._save_failed(error) from None

  def _save_failed(self, error: Exception) -> CheckpointError:
    # Orbax takes the steps a save would retire off its list when the save starts; after a
    # failure only the directory tells which steps are whole.
    self.manager.reload()
    kept = self.latest_step()
    kept = (f'the last complete checkpoint is step {kept}' if kept is not None
            else 'no checkpoint is complete')
    return CheckpointError(
        f'Saving checkpoint step {self.saving_step} to {self.directory} failed '
        f'({_first_line(error)}); stopping: {kept}. Free space or fix permissions there, then '
        'run the same command to resume.')

  def saved_config(self, step: int) -> dict:
    """The config `step` was trained with, as a plain dict: saved with it or, for a checkpoint
    from before configs were saved with each step, WORKDIR/config.json; in today's keys
    (`config.upgrade`)."""
    if not self._has_item(step, 'config'):
      return json.loads(load_config(self.directory.parent).to_json())
    return config_lib.upgrade(self._restore(step, config=ocp.args.JsonRestore()).config)

  def read_latest(self, read):
    """read(step) of the latest complete step; if a running trainer removes that step while it
    is read, again with the new latest (a few times at most)."""
    for _ in range(READ_ATTEMPTS):
      step = self.latest_step()
      if step is None:
        raise CheckpointError(f'No complete checkpoint in {self.directory}.')
      try:
        return read(step)
      except CheckpointVanished:
        continue
    raise CheckpointError(
        f'The latest checkpoint in {self.directory} was removed while it was read, '
        f'{READ_ATTEMPTS} times: its trainer saves faster than a checkpoint can be read. Raise '
        'train.keep_checkpoints, or evaluate after the run.')

  def save_params(self, step: int, params, host_state: dict,
                  config: ml_collections.ConfigDict) -> None:
    """Saves parameters without optimizer or data state (an imported model); training
    continues from them with a fresh optimizer (`holds_params_only`)."""
    self.save(step, {'step': np.int32(step), 'params': params},  # One value on every process.
              {**host_state, 'params_only': True}, config)

  def host_state(self, step: int) -> dict:
    """The host state saved with `step` (JSON: the data position, loop counters, ...)."""
    return self._restore(step, host=ocp.args.JsonRestore()).host

  def holds_params_only(self, step: int) -> bool:
    return bool(self.host_state(step).get('params_only'))

  def restore(self, step: int, abstract_state):
    """(state, host_state) of `step`, with arrays placed as abstract_state's shardings say,
    read in the dtypes they were saved in, checked against the checksums saved with them, then
    cast to abstract_state's dtypes (`_as_saved`)."""
    restored = self._restore(
        step, state=ocp.args.StandardRestore(self._as_saved(step, abstract_state)),
        host=ocp.args.JsonRestore())
    self._verify(step, restored.state)
    return _cast_like(restored.state, abstract_state), restored.host

  def restore_params(self, step: int, abstract_params):
    """Only the parameters of `step` (the optimizer state is never read), checked against their
    checksums, in abstract_params' dtypes."""
    saved = self._as_saved(step, {'params': abstract_params})
    restore_args = jax.tree.map(lambda a: ocp.ArrayRestoreArgs(sharding=a.sharding), saved)
    restored = self._restore(step, state=ocp.args.PyTreeRestore(
        item=saved, restore_args=restore_args, partial_restore=True))
    self._verify(step, {'params': restored.state['params']})
    return _cast_like(restored.state['params'], abstract_params)

  def _as_saved(self, step: int, abstract_tree):
    """abstract_tree with each array's dtype as saved in `step`: a checksum holds for the saved
    bits only, and a dtype may differ (bfloat16 models saved before the output projections'
    fix held them in float32). Unchanged where the metadata cannot be read: the restore itself
    then reports the damage."""
    try:
      saved = ocp.StandardCheckpointHandler().metadata(self.directory / str(step) / 'state').tree
    except Exception:  # Orbax raises many types for missing or damaged metadata.
      return abstract_tree
    dtypes = {_key(path): leaf.dtype
              for path, leaf in jax.tree_util.tree_flatten_with_path(saved)[0]}
    return jax.tree_util.tree_map_with_path(
        lambda path, a: jax.ShapeDtypeStruct(a.shape, dtypes.get(_key(path), a.dtype),
                                             sharding=a.sharding), abstract_tree)

  def _has_item(self, step: int, item: str) -> bool:
    return (self.directory / str(step) / item).is_dir()

  def _verify(self, step: int, tree) -> None:
    """Raises CheckpointError naming the first array whose bits differ from those saved (for
    checkpoints saved with checksums) or that holds a non-finite value."""
    saved = (self._restore(step, checksums=ocp.args.JsonRestore()).checksums
             if self._has_item(step, 'checksums') else {})
    for key, (checksum, finite) in sorted(checksums(tree).items()):
      if key in saved and saved[key] != checksum:
        problem = 'differs from the checksum saved with it'
      elif not finite:
        problem = 'holds non-finite values'
      else:
        continue
      raise CheckpointError(
          f'Checkpoint {self.directory / str(step)} is damaged: {key} {problem}. Remove that '
          'directory to resume from the previous checkpoint.')

  def _restore(self, step: int, **items):
    if step not in self.manager.all_steps():
      raise CheckpointError(f'No complete checkpoint for step {step} in {self.directory} '
                            f'(complete steps: {list(self.manager.all_steps())}).')
    try:
      return self.manager.restore(step, args=ocp.args.Composite(**items))
    except Exception as error:  # Orbax and TensorStore raise many types for damaged files.
      self.manager.reload()
      if step not in self.manager.all_steps():
        raise CheckpointVanished(
            f'Checkpoint {self.directory / str(step)} was removed while it was read (its '
            'trainer keeps only the latest train.keep_checkpoints).') from None
      raise CheckpointError(
          f'Checkpoint {self.directory / str(step)} is damaged or incomplete and cannot be '
          f'restored ({_first_line(error)}). Remove that directory to resume from the previous '
          'checkpoint.') from None

  def _remove_deleted(self) -> None:
    """Removes the old steps orbax renamed into checkpoints/deleting: by the writer's process 0
    alone (where orbax renames them), when no save of its is running."""
    if not self.read_only and jax.process_index() == 0:
      shutil.rmtree(self.directory / DELETING, ignore_errors=True)

  def close(self) -> None:
    """Waits for the last save (CheckpointError if it failed), removes the steps it retired
    and releases the manager."""
    self.wait()
    self._remove_deleted()
    self.manager.close()


def _first_line(error: Exception, limit: int = 300) -> str:
  """'Type: first line of the message' of an exception or, if it has one, of its cause; a long
  line keeps its start and its end (where TensorStore puts the operating system's reason)."""
  cause = error.__cause__ or error
  text = str(cause).strip()
  line = text.splitlines()[0] if text else ''
  if len(line) > limit:
    line = f'{line[:limit // 2]} ... {line[-limit // 2:]}'
  return f'{type(cause).__name__}: {line}'
