"""Ahead-of-time compilation for TPU topologies and NVIDIA GPUs this machine does not have (the
TPU runtime in the environment, jax's CUDA plugin in `.gpu-aot`: tests.helpers.GPU_AOT)."""

import importlib.util
import json
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import paper
from gated_attention import aot
from gated_attention import config as config_lib
from gated_attention import flops
from gated_attention import moe
from gated_attention import sharding
from gated_attention.train import compile_train_step, setup_train_state

from tests import helpers
from tests.helpers import GPU_AOT, needs_cuda_plugin

needs_tpu_runtime = pytest.mark.skipif(
    importlib.util.find_spec('libtpu') is None,
    reason='the TPU runtime (requirements-tpu.txt) is not installed')
V5E_2X2 = 'v5e:2x2'


@needs_tpu_runtime
@pytest.mark.parametrize('model', sorted(paper.MODELS))
def test_mini_presets_compile_for_a_v5e_slice_and_report_memory(model):
  config = paper.get_config(f'model={model},gate=g1_elementwise,scale=mini')
  config.mesh.update(data=1, fsdp=4)
  report = aot.compile_report(config, aot.topology_devices(V5E_2X2), traffic_top=3)
  assert (report['devices'], report['device_kind']) == (4, 'TPU v5 lite')
  assert report['mesh'] == {'data': 1, 'fsdp': 4, 'tensor': 1, 'expert': 1}
  assert report['device_memory_bytes'] == 16 * aot.GIB and report['fits'] is True
  # The compiler's threads cannot use more CPU time than the host's cores had.
  assert 0 < report['compile_cpu_seconds'] <= report['host_cores'] * report['compile_seconds'] + 0.5
  train = report['train_step']
  assert train['total'] >= report['parameter_bytes'] + report['optimizer_state_bytes'] > 0
  # A quarter of the float32 parameters (fsdp=4) on each chip, and twice that of Adam moments.
  assert report['parameter_bytes'] == pytest.approx(4 * report['params_total'] / 4, rel=0.02)
  assert report['optimizer_state_bytes'] == pytest.approx(2 * report['parameter_bytes'], rel=0.01)
  # XLA's count includes what the formula leaves out (norms, softmax, the optimizer) and, for the
  # dropless MoE, every expert's empty slots: it may exceed the model FLOPs, never fall short.
  ratio = report['compiled_flops_per_device'] / report['model_flops_per_device']
  assert 0.8 < ratio < (2.0 if config.model.moe.num_experts == 0 else 10.0)
  # libtpu gives no loop its trip count: each (layers, microbatches, loss chunks) is read from
  # its condition. The step reads its state and writes it anew, at least.
  traffic = report['traffic']
  assert traffic['loops_without_trip_count'] == 0 and report['memory_bandwidth'] == 819 * 10**9
  assert traffic['bytes'] >= 2 * (report['parameter_bytes'] + report['optimizer_state_bytes'])


def _compile_only(*args, path=()):
  """experiments.compile_only in a process of its own, with `path` on its PYTHONPATH."""
  return helpers.run([sys.executable, '-m', 'experiments.compile_only', *args], path=path)


@needs_tpu_runtime
def test_an_impossible_mesh_for_the_topology_is_the_usual_error():
  result = _compile_only('--config=configs/paper.py:model=dense_1p7b_28l,scale=mini',
                         f'--topology={V5E_2X2}', '--config.mesh.fsdp=8', '--config.mesh.data=1')
  assert result.returncode == 1
  assert ('error: mesh.data=1, mesh.fsdp=8, mesh.tensor=1, mesh.expert=1: the product 8 must '
          'equal the device count 4') in result.stderr
  assert 'Traceback' not in result.stderr


@needs_tpu_runtime
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
  with pytest.raises(aot.CompileError, match="--topology='v9z:1x1' is not a TPU topology .* nor "
                     "NVIDIA GPUs .*h200:8"):
    aot.topology_devices('v9z:1x1')
  with pytest.raises(aot.CompileError, match='--num_slices=2: slices are of a TPU topology'):
    aot.topology_devices('local', num_slices=2)


def test_local_topology_compiles_for_the_devices_at_hand_and_judges_the_host_memory():
  """On CPUs a step fits in the host's physical memory shared by its devices, as training
  checks it: the same tiny model fits at 4 x 32 tokens and not at 256 x 2,048 with [L, L]
  attention scores (about 227 GiB per device)."""
  config = config_lib.base_config('tiny')
  config.data.update(batch_size=4, seq_len=32)
  config.eval.batch_size = 4
  host_share = os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES') // jax.local_device_count()
  report = aot.compile_report(config, aot.topology_devices('local'))
  assert report['device_kind'] == 'cpu' and report['train_step']['total'] > 0
  assert report['device_memory_bytes'] == host_share and report['fits'] is True
  # auto runs cpu_flash on CPUs, a kernel XLA's cost analysis cannot see into.
  assert 'attention (cpu_flash) left out' in aot.format_report(report)
  config.model.attention_impl = 'xla'
  config.data.update(batch_size=256, seq_len=2048)
  report = aot.compile_report(config, aot.topology_devices('local'))
  assert report['train_step']['total'] > host_share and report['fits'] is False
  assert report['too_large'] == ['train_step']


@needs_tpu_runtime
def test_an_eval_step_that_does_not_fit_is_named_though_the_train_step_fits():
  """The held-out batch is evaluated at once: 4,096 sequences of 4,096 tokens with the whole
  151,936-id logits do not fit a v5e chip, while the train step of 8 sequences does."""
  result = _compile_only('--config=configs/paper.py:model=dense_1p7b_28l,scale=mini',
                         f'--topology={V5E_2X2}', '--config.mesh.fsdp=4', '--config.mesh.data=1',
                         '--config.model.vocab_size=151936', '--config.data.seq_len=4096',
                         '--config.data.batch_size=8', '--config.eval.batch_size=4096',
                         '--config.model.loss_chunk=0')
  assert result.returncode == 1, result.stderr[-2000:]
  assert 'error: the eval step does not fit' in result.stderr
  assert 'Lower eval.batch_size' in result.stderr and 'on a TPU v5 lite' in result.stderr
  assert 'train step' not in result.stderr and 'Traceback' not in result.stderr


@needs_tpu_runtime
def test_multi_slice_topology_puts_the_data_axis_across_slices():
  devices = aot.topology_devices(V5E_2X2, num_slices=2)
  assert [device.slice_index for device in devices] == [0] * 4 + [1] * 4
  mesh = sharding.make_mesh(dict(data=2, fsdp=4, tensor=1, expert=1), devices)
  for row, slice_index in zip(mesh.devices.reshape(2, -1), (0, 1)):
    assert {device.slice_index for device in row} == {slice_index}  # fsdp stays within a slice.


def test_compiled_flops_multiply_out_the_scan_microbatch_and_loss_loops():
  """The extrapolated count of a scanned, microbatched, chunked-loss step equals XLA's direct
  count of the same step with every loop unrolled."""
  config = config_lib.base_config('tiny')
  config.model.update(num_layers=3, d_model=32, num_heads=4, num_kv_heads=2, head_dim=8,
                      mlp_dim=64, attention_impl='xla', scan_layers=True, loss_chunk=8)
  config.data.update(batch_size=4, seq_len=32)
  config.train.microbatches = 2
  mesh = sharding.make_mesh(config.mesh, jax.devices()[:1])
  extrapolated = aot.compiled_flops(config, mesh)
  config.model.update(scan_layers=False, loss_chunk=0)
  config.train.microbatches = 1
  direct = compile_train_step(config, setup_train_state(config, mesh)).cost_analysis()['flops']
  assert extrapolated == pytest.approx(direct, rel=0.005)


def test_compiled_flops_count_xla_attention_over_the_full_square():
  """As compile_only says beside the count: XLA counts `xla` attention's masked half too, twice
  the formula's causal 6 x layers x heads x head_dim x seq_len per token, and `cpu_flash` (a
  kernel it cannot see into) not at all."""
  config = config_lib.base_config('tiny')
  config.model.update(num_layers=1, num_heads=4, num_kv_heads=2, head_dim=64, remat='none')
  config.data.update(batch_size=2, seq_len=256)
  mesh = sharding.make_mesh(config.mesh, jax.devices()[:1])
  counts = {}
  for impl in ('xla', 'cpu_flash'):
    config.model.attention_impl = impl
    counts[impl] = aot.compiled_flops(config, mesh)
  causal = 6 * 1 * 4 * 64 * 256 * (2 * 256)
  assert (counts['xla'] - counts['cpu_flash']) / causal == pytest.approx(2, rel=0.1)


def test_every_attention_implementation_says_how_compiled_flops_count_it():
  assert set(aot.ATTENTION_IN_COMPILED_FLOPS) == set(config_lib.ATTENTION_IMPLS) - {'auto'}


@needs_tpu_runtime
def test_grouped_matmul_compiles_for_tpu_to_grouped_gemms_forward_and_backward():
  """On TPU the MoE's grouped matmuls run the megablox kernels: the product and both gradients
  count the routed work, 3 x 2mkn. XLA's own ragged_dot makes the weight gradient a dense
  product over all g groups (g x 2mkn on its own, so g + 2 in all)."""
  m, k, n, groups = 1024, 256, 512, 8
  mesh = jax.sharding.Mesh(np.array(aot.topology_devices(V5E_2X2)[:1]), ('x',))
  shapes = [jax.ShapeDtypeStruct(shape, dtype, sharding=sharding.replicated(mesh))
            for shape, dtype in (((m, k), jnp.bfloat16), ((groups, k, n), jnp.bfloat16),
                                 ((groups,), jnp.int32))]
  counted = {}
  for pallas in (True, False):
    loss = lambda lhs, rhs, sizes: jnp.sum(
        moe.grouped_matmul(lhs, rhs, sizes, pallas).astype(jnp.float32) ** 2)
    with jax.set_mesh(mesh):
      compiled = jax.jit(jax.grad(loss, argnums=(0, 1))).lower(*shapes).compile()
    counted[pallas] = compiled.cost_analysis()['flops'] / (2 * m * k * n)
  assert 3 <= counted[True] < 3.1 and counted[False] > groups + 2, counted


@pytest.mark.parametrize('device_kind, memory, peak', [
    ('NVIDIA A100-SXM4-40GB', 40 * aot.GIB, 312e12),
    ('NVIDIA A100-SXM4-80GB', 80 * aot.GIB, 312e12),
    ('NVIDIA H100 PCIe', 81_559 * 2**20, 756e12),
    ('NVIDIA H100 80GB HBM3', 81_559 * 2**20, 989e12),
    ('NVIDIA H100 NVL', 94 * 10**9, 835e12),
    ('TPU v5 lite', 16 * aot.GIB, 197e12),
    ('cpu', None, None)])
def test_a_variant_of_a_chip_is_not_taken_for_its_larger_sibling(device_kind, memory, peak):
  """Tables matched by the first substring: the 40 GB A100 and the PCIe and NVL H100 come
  before the names they contain (NVIDIA's data sheets: memory, dense bf16 FLOP/s; the H100's
  memory as CUDA reports it)."""
  assert aot.device_memory(device_kind) == memory
  assert flops.peak_flops_per_device(device_kind) == peak


# The tiny model at 1,024 tokens in bfloat16 (cuDNN's attention takes no float32).
TINY = ('--config=configs/lm.py:size=tiny', '--config.model.dtype=bfloat16',
        '--config.data.seq_len=1024', '--config.data.batch_size=8', '--config.eval.batch_size=8',
        '--config.mesh.data=1')


def _gpu_report(topology: str, *flags) -> dict:
  result = _compile_only('--json', f'--topology={topology}', *TINY, *flags, path=[GPU_AOT])
  assert result.returncode == 0, result.stderr[-3000:]
  return json.loads(result.stdout)  # Progress lines go to standard error.


@needs_cuda_plugin
def test_a_multi_host_gpu_cluster_compiles_with_fsdp_and_cudnn_attention():
  report = _gpu_report('h100:2x4', '--config.mesh.fsdp=8', '--traffic=5')
  assert (report['devices'], report['device_kind']) == (8, 'NVIDIA H100 80GB HBM3')
  assert report['mesh'] == {'data': 1, 'fsdp': 8, 'tensor': 1, 'expert': 1}
  assert report['attention_impl'] == 'cudnn'  # What `auto` picks for a GPU.
  assert report['device_memory_bytes'] == 81_559 * 2**20 and report['fits'] is True
  # An eighth of the float32 parameters on each GPU, and twice that of Adam's moments.
  assert report['parameter_bytes'] == pytest.approx(4 * report['params_total'] / 8, rel=0.02)
  assert report['optimizer_state_bytes'] == pytest.approx(2 * report['parameter_bytes'], rel=0.01)
  train = report['train_step']
  assert train['total'] >= report['parameter_bytes'] + report['optimizer_state_bytes']
  # The step reads its parameters and optimizer state and writes them anew at least.
  assert report['memory_bandwidth'] == 3350 * 10**9 and len(report['traffic']['top_ops']) == 5
  assert report['traffic']['bytes'] >= 2 * (report['parameter_bytes']
                                            + report['optimizer_state_bytes'])


@needs_cuda_plugin
def test_cudnn_attention_leaves_out_the_scores_that_xla_attention_keeps():
  """`xla` attention keeps each layer's float32 [heads, L, L] probabilities for the backward
  pass; cuDNN's fused kernel keeps none. 8 sequences on one H200, 4 layers of 4 heads."""
  scores = {impl: _gpu_report('h200:1', f'--config.model.attention_impl={impl}')
            for impl in ('xla', 'cudnn')}
  assert {report['attention_impl'] for report in scores.values()} == {'xla', 'cudnn'}
  one_layer = 8 * 4 * 1024 * 1024 * 4  # Bytes of one layer's float32 [8, 4, L, L].
  saved = (scores['xla']['train_step']['temporaries']
           - scores['cudnn']['train_step']['temporaries'])
  assert saved >= 4 * one_layer


@needs_cuda_plugin
def test_save_dots_keeps_cudnns_attention_output_and_full_runs_its_forward_again():
  """remat=save_dots keeps what cuDNN's forward kernel returns for the backward pass, so the
  train step runs that kernel once per layer; `full` runs it again in the backward pass."""
  layers = 4  # configs/lm.py:size=tiny
  for remat, runs in (('save_dots', 1), ('full', 2)):
    report = _gpu_report('h200:1', '--config.model.attention_impl=cudnn',
                         f'--config.model.remat={remat}', '--traffic=100000')
    forwards = [op for op in report['traffic']['top_ops']
                if op['source'].endswith('dot_product_attention_fwd')]
    assert forwards and {op['category'] for op in forwards} == {'attention'}, remat
    assert sum(op['executions'] for op in forwards) == runs * layers, remat


@pytest.mark.skipif(aot.cuda_plugin_installed(), reason='a CUDA plugin is on this path')
def test_gpu_topologies_without_the_plugin_name_what_to_install():
  with pytest.raises(aot.CompileError, match=r"--topology='h200:8'.*--target \.gpu-aot -r "
                     r"requirements-gpu-aot\.txt, then run with PYTHONPATH=\.gpu-aot"):
    aot.topology_devices('h200:8')


def test_a_gpu_target_is_a_named_model_or_a_target_config_file(tmp_path):
  named = aot.gpu_target_config('H200')
  assert 'device_description_str: "NVIDIA H200"' in named
  assert f'device_memory_size: {143_771 * 2**20}' in named
  assert 'cuda_compute_capability { major: 9 minor: 0 }' in named
  assert f'memory_bandwidth: {4800 * 10**9}' in named
  # The PCIe H100 (2.0 TB/s) is not taken for the SXM part whose name it contains.
  assert (aot.device_bandwidth('NVIDIA H100 PCIe'), aot.device_bandwidth('NVIDIA H100 80GB HBM3'),
          aot.device_bandwidth('cpu')) == (2000 * 10**9, 3350 * 10**9, None)
  own = tmp_path / 'a100.txtpb'
  own.write_text('device_description_str: "NVIDIA A100-SXM4-80GB"\n')
  assert aot.gpu_target_config(str(own)) == own.read_text()
  with pytest.raises(aot.CompileError, match='cannot read the GPU target'):
    aot.gpu_target_config(str(tmp_path / 'missing.txtpb'))
  with pytest.raises(aot.CompileError, match="'a100' is not a GPU .* h100, h200 or a "
                                             "GpuTargetConfigProto"):
    aot.gpu_target_config('a100')
