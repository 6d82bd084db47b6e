"""Checksums of saved arrays against a NumPy reference, and what a restore refuses."""

import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gated_attention import checkpoint as checkpoint_lib
from gated_attention import config as config_lib


def _reference_checksum(array: np.ndarray) -> int:
  """sum(bits[i] * (i * 0x9E3779B1 | 1)) mod 2**32 over the row-major flat index i."""
  unsigned = np.dtype(f'uint{8 * array.dtype.itemsize}')
  bits = array.reshape(-1).view(unsigned).astype(np.uint64)
  index = np.arange(bits.size, dtype=np.uint64)
  weights = ((index * 0x9E3779B1) % 2**32) | 1
  return int(np.sum((bits * weights) % 2**32) % 2**32)


def test_checksums_match_the_reference_for_every_dtype():
  rng = np.random.default_rng(0)
  tree = {'embedding': rng.normal(size=(7, 5)).astype(np.float32),
          'scale': rng.normal(size=(3,)).astype(jnp.bfloat16),
          'opt_state': (rng.integers(-9, 9, size=(2, 3, 4)).astype(np.int32),),
          'step': np.int32(12)}
  sums = checkpoint_lib.checksums(jax.tree.map(jnp.asarray, tree))
  assert set(sums) == {'embedding', 'scale', 'opt_state/0', 'step'}
  for key, array in (('embedding', tree['embedding']), ('scale', tree['scale']),
                     ('opt_state/0', tree['opt_state'][0]), ('step', np.asarray(tree['step']))):
    assert sums[key] == (_reference_checksum(array), True), key


def test_any_changed_element_or_swap_changes_the_checksum():
  x = np.random.default_rng(1).normal(size=(64, 8)).astype(np.float32)
  original = checkpoint_lib.checksums({'x': jnp.asarray(x)})['x'][0]
  flipped = x.copy()
  flipped.view(np.uint32)[17, 3] ^= 1 << 31  # One sign bit.
  swapped = x.copy()
  swapped[[2, 40]] = swapped[[40, 2]]
  for changed in (flipped, swapped):
    assert checkpoint_lib.checksums({'x': jnp.asarray(changed)})['x'][0] != original


@pytest.mark.parametrize('bad', [np.nan, np.inf, -np.inf])
def test_non_finite_values_are_flagged(bad):
  x = np.zeros((4, 4), np.float32)
  x[2, 1] = bad
  assert checkpoint_lib.checksums({'x': jnp.asarray(x)})['x'][1] is False


def test_arrays_are_checked_in_the_dtype_they_were_saved_in_and_cast_to_the_models(tmp_path):
  """A float32 array restored into a bfloat16 state passes its checksum (taken on the saved
  bits) and arrives as the bfloat16 rounding of the saved values, by both restore paths."""
  rng = np.random.default_rng(0)
  saved = {'step': jnp.int32(3),
           'params': {'wo': jnp.asarray(rng.normal(size=(4, 8)), jnp.float32),
                      'scale': jnp.asarray(rng.normal(size=(8,)), jnp.bfloat16)}}
  checkpointer = checkpoint_lib.Checkpointer(tmp_path)
  checkpointer.save(3, saved, {}, config_lib.base_config('tiny'))
  checkpointer.wait()
  sharding = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  abstract = jax.tree.map(
      lambda x: jax.ShapeDtypeStruct(x.shape, jnp.bfloat16 if x.ndim else x.dtype,
                                     sharding=sharding), saved)
  state, _ = checkpointer.restore(3, abstract)
  checkpointer.close()
  reader = checkpoint_lib.Checkpointer(tmp_path)  # An evaluation's: parameters only.
  params = reader.restore_params(3, abstract['params'])
  reader.close()
  for restored in (state['params'], params):
    assert restored['wo'].dtype == jnp.bfloat16
    np.testing.assert_array_equal(np.asarray(restored['wo'], np.float32),
                                  np.asarray(saved['params']['wo'].astype(jnp.bfloat16),
                                             np.float32))
    np.testing.assert_array_equal(restored['scale'], saved['params']['scale'])


def test_a_retired_step_leaves_the_step_directories_whole_before_anything_is_removed(
    tmp_path, monkeypatch):
  """keep=2: saving step 3 retires step 1. It is renamed away whole first, so a kill while its
  files are removed (simulated: the removal fails halfway) leaves no partial step that a
  listing would take as complete; the remains go at the next save."""
  state = {'step': jnp.int32(0), 'params': {'w': jnp.arange(8, dtype=jnp.float32)}}
  config = config_lib.base_config('tiny')
  checkpoints = tmp_path / 'checkpoints'
  seen, rmtree = [], shutil.rmtree

  def killed_halfway(path, ignore_errors=False):
    seen.append(({p.name for p in checkpoints.iterdir()},
                 sorted(p.name for p in (path / '1').iterdir())))
    rmtree(path / '1' / 'state')
    raise KeyboardInterrupt

  checkpointer = checkpoint_lib.Checkpointer(tmp_path, keep=2)
  for step in (1, 2, 3):
    checkpointer.save(step, state, {}, config)
  checkpointer.wait()
  monkeypatch.setattr(checkpoint_lib.shutil, 'rmtree', killed_halfway)
  with pytest.raises(KeyboardInterrupt):
    checkpointer.close()
  listed, retired = seen[0]
  assert listed == {'2', '3', checkpoint_lib.DELETING} and retired == sorted(
      p.name for p in (checkpoints / '2').iterdir())  # Step 1 moved whole: all of a step's items.
  monkeypatch.undo()
  checkpointer = checkpoint_lib.Checkpointer(tmp_path, keep=2)
  assert checkpointer.manager.all_steps() == [2, 3]
  checkpointer.save(4, state, {}, config)
  checkpointer.close()
  assert {p.name for p in checkpoints.iterdir()} == {'3', '4'}
