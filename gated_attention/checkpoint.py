"""Orbax checkpoints: one manager per run holding the train state (step, parameters, optimizer
state) and the host's state (the data iterator's position and the loop's counters, as JSON),
plus the run's config as JSON beside them.

Orbax writes each step into a temporary directory and renames it when complete, so a run killed
mid-save leaves no directory that `latest_step` would take as whole.
"""

import json
import pathlib

import jax
import jax.numpy as jnp
import ml_collections
import orbax.checkpoint as ocp


class CheckpointError(RuntimeError):
  """A checkpoint or workdir that cannot be used; the message names the path."""


def config_path(workdir) -> pathlib.Path:
  return pathlib.Path(workdir) / 'config.json'


def save_config(workdir, config: ml_collections.ConfigDict) -> None:
  """Writes WORKDIR/config.json, or checks that the model config matches the one there."""
  path = config_path(workdir)
  if path.exists():
    saved = load_config(workdir)
    if saved.model.to_dict() != config.model.to_dict():
      differing = ', '.join(f'model.{k}' for k in sorted(set(saved.model) | set(config.model))
                            if saved.model.get(k) != config.model.get(k))
      raise CheckpointError(f'{workdir} holds a run with a different model config ({differing} '
                            'differ); use a new --workdir or the same config.')
    return
  path.parent.mkdir(parents=True, exist_ok=True)
  temporary = path.with_suffix('.tmp')
  temporary.write_text(config.to_json(indent=2))
  temporary.rename(path)


def load_config(workdir) -> ml_collections.ConfigDict:
  path = config_path(workdir)
  try:
    return ml_collections.ConfigDict(json.loads(path.read_text()))
  except FileNotFoundError:
    raise CheckpointError(f'{path} does not exist: is {workdir} a training workdir?') from None
  except json.JSONDecodeError as error:
    raise CheckpointError(f'{path} is not valid JSON ({error}).') from None


class Checkpointer:
  """Saves and restores {'state': train state pytree, 'host': JSON-able dict} by step."""

  def __init__(self, workdir, keep: int | None = None, read_only: bool = False):
    """read_only: for evaluation; the directory must exist and nothing is written."""
    self.directory = pathlib.Path(workdir).absolute() / 'checkpoints'
    options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=not read_only,
                                           enable_async_checkpointing=True)
    self.manager = ocp.CheckpointManager(self.directory, options=options,
                                         item_names=('state', 'host'))

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def save(self, step: int, state, host_state: dict) -> None:
    """Starts an asynchronous save; arrays are copied before this returns."""
    self.manager.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave(state), host=ocp.args.JsonSave(host_state)), force=True)

  def save_params(self, step: int, params, host_state: dict) -> None:
    """Saves parameters without optimizer or data state (an imported model); training
    continues from them with a fresh optimizer (`holds_params_only`)."""
    self.save(step, {'step': jnp.asarray(step, jnp.int32), 'params': params},
              {**host_state, 'params_only': True})

  def holds_params_only(self, step: int) -> bool:
    return bool(self._restore(step, host=ocp.args.JsonRestore()).host.get('params_only'))

  def restore(self, step: int, abstract_state):
    """(state, host_state) of `step`, with arrays placed as abstract_state's shardings say."""
    restored = self._restore(step, state=ocp.args.StandardRestore(abstract_state),
                             host=ocp.args.JsonRestore())
    return restored.state, restored.host

  def restore_params(self, step: int, abstract_params):
    """Only the parameters of `step` (the optimizer state is never read)."""
    restore_args = jax.tree.map(lambda a: ocp.ArrayRestoreArgs(sharding=a.sharding),
                                abstract_params)
    restored = self._restore(step, state=ocp.args.PyTreeRestore(
        item={'params': abstract_params}, restore_args={'params': restore_args},
        partial_restore=True))
    return restored.state['params']

  def _restore(self, step: int, **items):
    if step not in self.manager.all_steps():
      raise CheckpointError(f'No complete checkpoint for step {step} in {self.directory} '
                            f'(complete steps: {list(self.manager.all_steps())}).')
    try:
      return self.manager.restore(step, args=ocp.args.Composite(**items))
    except Exception as error:  # Orbax and TensorStore raise many types for damaged files.
      cause = error.__cause__ or error
      first_line = str(cause).strip().splitlines()[0][:400] if str(cause).strip() else ''
      raise CheckpointError(
          f'Checkpoint {self.directory / str(step)} is damaged or incomplete and cannot be '
          f'restored ({type(cause).__name__}: {first_line}). Remove that directory to resume '
          'from the previous checkpoint.') from None

  def wait(self) -> None:
    """Blocks until the last asynchronous save is complete on disk."""
    self.manager.wait_until_finished()

  def close(self) -> None:
    self.manager.close()
