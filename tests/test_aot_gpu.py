"""Ahead-of-time compilation for NVIDIA GPUs on a host without one, through jax's CUDA plugin.

`.ci/run` installs requirements-gpu-aot.txt into `.gpu-aot`, which only these tests' command
lines put on their path: the plugin's libraries announce on every import of jax that they found
no GPU, which the other tests' output need not carry."""

import json
import os
import subprocess
import sys

import pytest

from gated_attention import aot
from tests.helpers import REPO

GPU_AOT = REPO / '.gpu-aot'
needs_plugin = pytest.mark.skipif(
    not (GPU_AOT / 'jax_plugins').is_dir(),
    reason='the CUDA plugin is not installed in .gpu-aot (pip install --no-deps --target .gpu-aot '
    '-r requirements-gpu-aot.txt)')
# The tiny model at 1,024 tokens in bfloat16 (cuDNN's attention takes no float32).
TINY = ('--config=configs/lm.py:size=tiny', '--config.model.dtype=bfloat16',
        '--config.data.seq_len=1024', '--config.data.batch_size=8', '--config.eval.batch_size=8',
        '--config.mesh.data=1')


def _compile_report(topology: str, *flags) -> dict:
  result = subprocess.run(
      [sys.executable, '-m', 'experiments.compile_only', '--json', f'--topology={topology}',
       *TINY, *flags], cwd=REPO, capture_output=True, text=True, timeout=300,
      env=dict(os.environ, JAX_PLATFORMS='cpu',
               PYTHONPATH=os.pathsep.join([str(REPO), str(GPU_AOT)])))
  assert result.returncode == 0, result.stderr[-3000:]
  return json.loads(result.stdout[result.stdout.index('\n{') + 1:])


@needs_plugin
def test_a_multi_host_gpu_cluster_compiles_with_fsdp_and_cudnn_attention():
  report = _compile_report('h100:2x4', '--config.mesh.fsdp=8', '--traffic=5')
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


@needs_plugin
def test_cudnn_attention_leaves_out_the_scores_that_xla_attention_keeps():
  """`xla` attention keeps each layer's float32 [heads, L, L] probabilities for the backward
  pass; cuDNN's fused kernel keeps none. 8 sequences on one H200, 4 layers of 4 heads."""
  scores = {impl: _compile_report('h200:1', f'--config.model.attention_impl={impl}')
            for impl in ('xla', 'cudnn')}
  assert {report['attention_impl'] for report in scores.values()} == {'xla', 'cudnn'}
  one_layer = 8 * 4 * 1024 * 1024 * 4  # Bytes of one layer's float32 [8, 4, L, L].
  saved = (scores['xla']['train_step']['temporaries']
           - scores['cudnn']['train_step']['temporaries'])
  assert saved >= 4 * one_layer


@pytest.mark.skipif(aot.cuda_plugin_installed(), reason='a CUDA plugin is on this path')
def test_gpu_topologies_without_the_plugin_name_what_to_install():
  with pytest.raises(aot.CompileError, match=r"--topology='h200:8'.*requirements-gpu-aot\.txt"):
    aot.topology_devices('h200:8')
  with pytest.raises(aot.CompileError, match="--topology='v9z:1x1' is not a TPU topology.*h200:8"):
    aot.topology_devices('v9z:1x1')


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
