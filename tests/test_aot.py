"""Ahead-of-time compilation for TPU topologies this machine does not have."""

import os
import subprocess
import sys

import pytest

from configs import paper
from gated_attention import aot
from gated_attention import config as config_lib
from gated_attention import sharding

pytest.importorskip('libtpu', reason='the TPU runtime (requirements-tpu.txt) is not installed')
V5E_2X2 = 'v5e:2x2'


@pytest.mark.parametrize('model', sorted(paper.MODELS))
def test_mini_presets_compile_for_a_v5e_slice_and_report_memory(model):
  config = paper.get_config(f'model={model},gate=g1_elementwise,scale=mini')
  config.mesh.update(data=1, fsdp=4)
  report = aot.compile_report(config, aot.topology_devices(V5E_2X2))
  assert (report['devices'], report['device_kind']) == (4, 'TPU v5 lite')
  assert report['mesh'] == {'data': 1, 'fsdp': 4, 'tensor': 1, 'expert': 1}
  assert report['device_memory_bytes'] == 16 * aot.GIB and report['fits'] is True
  train = report['train_step']
  assert train['total'] >= report['parameter_bytes'] + report['optimizer_state_bytes'] > 0
  # A quarter of the float32 parameters (fsdp=4) on each chip, and twice that of Adam moments.
  assert report['parameter_bytes'] == pytest.approx(4 * report['params_total'] / 4, rel=0.02)
  assert report['optimizer_state_bytes'] == pytest.approx(2 * report['parameter_bytes'], rel=0.01)
  # XLA's count includes what the formula leaves out (norms, softmax, the optimizer) and, for the
  # dropless MoE, every expert's empty slots: it may exceed the model FLOPs, never fall short.
  ratio = report['compiled_flops_per_device'] / report['model_flops_per_device']
  assert 0.8 < ratio < (2.0 if config.model.moe.num_experts == 0 else 10.0)


def _compile_only(*args):
  return subprocess.run([sys.executable, '-m', 'experiments.compile_only', *args],
                        capture_output=True, text=True, timeout=300,
                        env=dict(os.environ, JAX_PLATFORMS='cpu'))


def test_an_impossible_mesh_for_the_topology_is_the_usual_error():
  result = _compile_only('--config=configs/paper.py:model=dense_1p7b_28l,scale=mini',
                         f'--topology={V5E_2X2}', '--config.mesh.fsdp=8', '--config.mesh.data=1')
  assert result.returncode == 1
  assert ('error: mesh.data=1, mesh.fsdp=8, mesh.tensor=1, mesh.expert=1: the product 8 must '
          'equal the device count 4') in result.stderr
  assert 'Traceback' not in result.stderr


def test_a_step_that_does_not_fit_exits_non_zero_naming_what_dominates():
  result = _compile_only('--config=configs/paper.py:model=dense_1p7b_28l,scale=mini',
                         f'--topology={V5E_2X2}', '--config.mesh.fsdp=4', '--config.mesh.data=1',
                         '--config.model.vocab_size=151936', '--config.data.seq_len=4096',
                         '--config.data.batch_size=64', '--config.eval.batch_size=4')
  assert result.returncode == 1, result.stderr[-2000:]
  assert 'error: the train step does not fit' in result.stderr
  assert 'activations and temporaries dominate on a TPU v5 lite' in result.stderr
  assert 'Traceback' not in result.stderr


def test_unknown_topology_is_named():
  with pytest.raises(aot.CompileError, match="--topology='v9z:1x1'"):
    aot.topology_devices('v9z:1x1')


def test_local_topology_compiles_for_the_devices_at_hand():
  config = config_lib.base_config('tiny')
  config.data.update(batch_size=4, seq_len=32)
  config.eval.batch_size = 4
  report = aot.compile_report(config, aot.topology_devices('local'))
  assert report['device_kind'] == 'cpu' and report['train_step']['total'] > 0
  assert report['fits'] is None  # No memory table entry for a CPU.


def test_multi_slice_topology_puts_the_data_axis_across_slices():
  devices = aot.topology_devices(V5E_2X2, num_slices=2)
  assert [device.slice_index for device in devices] == [0] * 4 + [1] * 4
  mesh = sharding.make_mesh(dict(data=2, fsdp=4, tensor=1, expert=1), devices)
  for row, slice_index in zip(mesh.devices.reshape(2, -1), (0, 1)):
    assert {device.slice_index for device in row} == {slice_index}  # fsdp stays within a slice.
