"""Ahead-of-time compilation for devices you need not have: a TPU slice described by name
(compiled here by libtpu), NVIDIA GPUs described by model and count (compiled here by jax's CUDA
plugin, no GPU or driver needed), or the local devices. Nothing is allocated. The same mesh,
sharding and step code as training, so what compiles here is what will run there."""

import importlib.util
import math
import os
import re
import time

import jax
import jax.numpy as jnp

from gated_attention import attention as attention_lib
from gated_attention import config as config_lib
from gated_attention import distributed
from gated_attention import flops as flops_lib
from gated_attention import sharding as sharding_lib
from gated_attention import traffic
from gated_attention.evaluate import make_eval_step
from gated_attention.summary import format_count, summarize
from gated_attention.tokenizer import pad_id
from gated_attention.train import (check_batch, compile_train_step, compiled_memory,
                                   setup_train_state)

GIB = 2**30
# Memory per chip (HBM) by jax.Device.device_kind substring, first match.
MEMORY_BY_DEVICE_KIND = (
    ('TPU v6 lite', 32 * GIB),
    ('TPU v5 lite', 16 * GIB),
    ('TPU v5p', 95 * GIB),
    ('TPU v5', 95 * GIB),
    ('TPU v4', 32 * GIB),
    ('H200', 143_771 * 2**20),  # What CUDA reports for the "141 GB" chip.
    ('H100 NVL', 94 * 10**9),
    ('H100', 81_559 * 2**20),  # The SXM "80 GB" chip, as CUDA reports it.
    ('A100-SXM4-40GB', 40 * GIB),
    ('A100-PCIE-40GB', 40 * GIB),
    ('A100', 80 * GIB),
)


# Memory bandwidth per chip (bytes/s, datasheets) by device_kind substring, first match.
BANDWIDTH_BY_DEVICE_KIND = (
    ('TPU v6 lite', 1640 * 10**9),
    ('TPU v5 lite', 819 * 10**9),
    ('TPU v5p', 2765 * 10**9),
    ('TPU v5', 2765 * 10**9),
    ('TPU v4', 1200 * 10**9),
    ('H200', 4800 * 10**9),
    ('H100 NVL', 3900 * 10**9),
    ('H100 PCIe', 2000 * 10**9),
    ('H100', 3350 * 10**9),
)
# NVIDIA GPUs that `--topology` names, by the device_kind they have: what XLA compiles for (a
# GpuTargetConfigProto, which a compile without the GPU needs in place of the device). Both are
# Hopper SXM parts, the same 132 SMs (compute capability 9.0) at 1.98 GHz with a 50 MiB L2;
# their memory and its bandwidth are those of the tables above.
GPU_TARGETS = {'h100': 'NVIDIA H100 80GB HBM3', 'h200': 'NVIDIA H200'}
# The cuDNN a GPU target is compiled for: the oldest that jax's CUDA plugin accepts.
GPU_TARGET_CUDNN = (9, 8, 0)
_GPU_TOPOLOGY = re.compile(r'^(?P<target>[^:]+):(?:(?P<hosts>\d+)x)?(?P<gpus>\d+)$')


# What XLA's cost analysis counts of each attention implementation's work (compiled_flops),
# where the model formula counts causal attention at half the [L, L] square. Kernels it cannot
# see into count as nothing (on GPUs only cuBLAS and cuDNN convolutions carry a count).
ATTENTION_IN_COMPILED_FLOPS = {
    'xla': 'attention over the full square, twice the formula\'s causal half',
    'dot_product': 'attention over the full square, twice the formula\'s causal half, where '
                   'XLA runs it (cuDNN\'s kernel, on GPUs: nothing)',
    'cudnn': 'attention (cudnn) left out',
    'splash': 'attention (splash) left out',
    'cpu_flash': 'attention (cpu_flash) left out',
    'chunked': 'attention (chunked) left out but for its block loops\' bodies, counted once',
}


class CompileError(RuntimeError):
  """The step does not compile for, or does not fit, the topology; the message says why."""


def device_memory(device_kind: str) -> int | None:
  return flops_lib.by_device_kind(MEMORY_BY_DEVICE_KIND, device_kind)


def device_bandwidth(device_kind: str) -> int | None:
  return flops_lib.by_device_kind(BANDWIDTH_BY_DEVICE_KIND, device_kind)


def memory_per_device(device) -> tuple[int | None, str]:
  """(bytes, what they are) one device may use: its chip's memory for accelerators (None where
  the table lacks the kind), the host's physical memory shared by its CPU devices."""
  if device.platform == 'cpu':
    count = jax.local_device_count()
    return (os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES') // count,
            f'host memory per CPU device ({count} device(s))')
  return device_memory(device.device_kind), f'memory of a {device.device_kind}'


def compile_here(topology: str) -> None:
  """Keeps jax on this host's CPU when `topology` names devices to compile for (anything but
  'local'): they are never run here, and a GPU plugin that finds no GPU must not be started.
  Call before jax starts its backends."""
  if topology != 'local':
    jax.config.update('jax_platforms', 'cpu')


def topology_devices(topology: str, num_slices: int = 1) -> list:
  """Compile-only devices of a TPU topology ('v5p:4x4x4') or of NVIDIA GPUs ('h200:8' for one
  host of 8, 'h100:4x8' for 4 hosts of 8; a GpuTargetConfigProto text file such as
  'a100.txtpb:8' for another model), or 'local' for the devices at hand."""
  if topology == 'local':
    if num_slices > 1:
      raise CompileError(f'--num_slices={num_slices}: slices are of a TPU topology; '
                         "--topology=local compiles for the devices at hand.")
    return jax.devices()
  gpus = _GPU_TOPOLOGY.match(topology)
  if gpus and (gpus['target'].lower() in GPU_TARGETS or gpus['target'].endswith('.txtpb')):
    return _gpu_devices(topology, gpus['target'], int(gpus['hosts'] or 1), int(gpus['gpus']),
                        num_slices)
  distributed.quiet_tpu_runtime()
  # Compile-only devices never touch a chip: the lock that keeps two processes off one TPU is
  # not needed.
  os.environ.setdefault('ALLOW_MULTIPLE_LIBTPU_LOAD', '1')
  from jax.experimental import topologies
  try:
    kwargs = {'num_slices': num_slices} if num_slices > 1 else {}
    return list(topologies.get_topology_desc(platform='tpu', topology_name=topology,
                                             **kwargs).devices)
  except Exception as error:  # libtpu raises plain runtime errors for unknown names.
    raise CompileError(f'--topology={topology!r} is not a TPU topology libtpu knows (for '
                       f'example v5e:2x2, v5p:4x4x4, v6e:8x8, v4:4x4x4) nor NVIDIA GPUs (for '
                       f'example h200:8, h100:4x8; the models: {", ".join(GPU_TARGETS)}, or a '
                       f'GpuTargetConfigProto text file ending in .txtpb): {error}') from None


def gpu_target_config(target: str) -> str:
  """The GpuTargetConfigProto (text format) of a named GPU, or the contents of a .txtpb file."""
  if target.endswith('.txtpb'):
    try:
      with open(target, encoding='utf-8') as file:
        return file.read()
    except OSError as error:
      raise CompileError(f'--topology: cannot read the GPU target {target!r}: {error}') from None
  if target.lower() not in GPU_TARGETS:
    raise CompileError(f'--topology: {target!r} is not a GPU this project describes; choose one '
                       f'of {", ".join(GPU_TARGETS)} or a GpuTargetConfigProto text file ending '
                       'in .txtpb.')
  description = GPU_TARGETS[target.lower()]
  memory, bandwidth = device_memory(description), device_bandwidth(description)
  major, minor, patch = GPU_TARGET_CUDNN
  return f"""gpu_device_info {{
  threads_per_block_limit: 1024  threads_per_warp: 32  threads_per_core_limit: 2048
  shared_memory_per_block: {48 * 1024}  shared_memory_per_block_optin: {227 * 1024}
  shared_memory_per_core: {228 * 1024}
  registers_per_core_limit: 65536  registers_per_block_limit: 65536
  core_count: 132  fpus_per_core: 128  clock_rate_ghz: 1.98
  block_dim_limit_x: {2**31 - 1}  block_dim_limit_y: 65535  block_dim_limit_z: 65535
  l2_cache_size: {50 * 2**20}  device_memory_size: {memory}  memory_bandwidth: {bandwidth}
  cuda_compute_capability {{ major: 9 minor: 0 }}
}}
platform_name: "CUDA"
dnn_version_info {{ major: {major} minor: {minor} patch: {patch} }}
device_description_str: "{description}"
"""


def cuda_plugin_installed() -> bool:
  """Whether jax's CUDA plugin (CUDA 12 or 13) is importable here."""
  return bool(importlib.util.find_spec('jax_plugins')) and any(
      importlib.util.find_spec(f'jax_plugins.xla_{cuda}') for cuda in ('cuda12', 'cuda13'))


def _gpu_devices(topology: str, target: str, hosts: int, gpus: int, num_slices: int) -> list:
  """Compile-only NVIDIA GPUs: `num_slices` x `hosts` x `gpus`, through jax's CUDA plugin."""
  if not cuda_plugin_installed():
    raise CompileError(
        f'--topology={topology!r} compiles for NVIDIA GPUs with jax\'s CUDA plugin, which is not '
        'on this Python\'s path: pip install --no-deps --target .gpu-aot -r '
        'requirements-gpu-aot.txt, then run with PYTHONPATH=.gpu-aot (no GPU or CUDA driver '
        'needed).')
  config = gpu_target_config(target)
  from jax.experimental import topologies
  try:
    return list(topologies.get_topology_desc(
        platform='cuda', topology=f'{num_slices}x{hosts}x{gpus}',
        target_config=config).devices)
  except Exception as error:  # The plugin raises plain runtime errors for a bad target.
    raise CompileError(f'--topology={topology!r}: the CUDA plugin refuses this GPU target: '
                       f'{error}') from None


def _bytes_per_device(abstract_tree) -> int:
  """Bytes one device holds of a tree of sharded ShapeDtypeStructs."""
  return sum(math.prod(leaf.sharding.shard_shape(leaf.shape)) * jnp.dtype(leaf.dtype).itemsize
             for leaf in jax.tree.leaves(abstract_tree))


# What to change when a step does not fit, by step.
FIT_ADVICE = {
    'train step': 'Shard more (a larger mesh.fsdp or mesh.tensor), raise train.microbatches, lower '
                  'data.batch_size, or use more devices (a larger slice).',
    'eval step': 'Lower eval.batch_size (the held-out sequences evaluated at once) or '
                 'model.loss_chunk, or use more devices.',
}


def _out_of_memory(error, setup, device_kind: str, step: str) -> Exception:
  """A compiler out-of-memory error as the not-fit message of `step` ('train step' or 'eval
  step'); other errors pass through."""
  message = str(error)
  if 'RESOURCE_EXHAUSTED' not in message and 'Ran out of memory' not in message:
    return error
  required = re.search(r'required for HLO temporaries \(([\d.]+)([GT])\)', message)
  parts = {'parameters': _bytes_per_device(setup.abstract_state['params']),
           'activations and temporaries': (float(required.group(1)) * GIB
                                           * (1024 if required.group(2) == 'T' else 1)
                                           if required else 0)}
  if step == 'train step':
    parts['optimizer state'] = _bytes_per_device(setup.abstract_state['opt_state'])
  dominant = max(parts, key=parts.get)
  return CompileError(
      f'the {step} does not fit: {message.strip().splitlines()[-1][:300]} Per device: '
      + ', '.join(f'{name} {size / GIB:.2f} GiB' for name, size in parts.items())
      + f'; {dominant} dominate on a {device_kind}. {FIT_ADVICE[step]}')


def compiled_flops(config, mesh) -> float | None:
  """Train-step FLOPs per device as XLA's cost model counts them, loops multiplied out.

  XLA counts a loop body once, so a scanned stack of layers, a microbatch loop or a chunked loss
  would count one layer, one microbatch, one chunk. The count is extrapolated instead from four
  compiles without loops: unrolled one- and two-layer versions of the model, the loss taken
  whole (a chunked loss recomputes nothing, so its FLOPs are the same), on one and on two
  sequences per batch shard. Each depth's count is a per-step part (the optimizer update) plus
  a per-sequence part, and both grow linearly with depth. Left out: the microbatch loop's
  gradient additions (one per parameter per microbatch). Attention is counted as
  `ATTENTION_IN_COMPILED_FLOPS` says."""
  shards = mesh.shape['data'] * mesh.shape['fsdp'] * mesh.shape['expert']
  per_step, per_unit = [], []  # By depth 1, 2; a unit is one sequence per batch shard.
  for layers in (1, 2):
    costs = []
    for units in (1, 2):
      part = config.copy_and_resolve_references()
      part.model.update(num_layers=layers, scan_layers=False, loss_chunk=0)
      part.data.batch_size = units * shards
      part.train.microbatches = 1
      cost = compile_train_step(part, setup_train_state(part, mesh)).cost_analysis() or {}
      if 'flops' not in cost:
        return None
      costs.append(cost['flops'])
    per_unit.append(costs[1] - costs[0])
    per_step.append(costs[0] - per_unit[-1])
  extra_layers = config.model.num_layers - 1
  at_depth = lambda counts: counts[0] + extra_layers * (counts[1] - counts[0])
  return at_depth(per_step) + config.data.batch_size / shards * at_depth(per_unit)


def compile_report(config, devices, traffic_top: int = 0) -> dict:
  """Compiles the train and eval steps for `devices`; returns per-device memory and FLOPs, and
  where `traffic_top` > 0 the train step's memory traffic with its `traffic_top` largest ops
  (`gated_attention.traffic`)."""
  config_lib.validate(config)
  mesh = sharding_lib.make_mesh(config.mesh, devices)
  check_batch(config, mesh)
  setup = setup_train_state(config, mesh)
  kind = devices[0].device_kind
  print(f'compiling the train step for {len(devices)} x {kind} (minutes for paper-scale models)',
        flush=True)
  started, cpu_started = time.perf_counter(), time.process_time()
  try:
    train_step = compile_train_step(config, setup)
  except jax.errors.JaxRuntimeError as error:
    raise _out_of_memory(error, setup, kind, 'train step') from None
  train_seconds = time.perf_counter() - started
  # The compiler's threads together: what a host with more cores could spread.
  train_cpu_seconds = time.process_time() - cpu_started
  abstract_params = setup.abstract_state['params']
  tokens = jax.ShapeDtypeStruct((config.eval.batch_size, config.data.seq_len + 1), jnp.int32,
                                sharding=setup.batch_sharding)
  try:
    with jax.set_mesh(mesh):
      eval_step = jax.jit(make_eval_step(setup.graphdef, analysis=False,
                                         pad_id=pad_id(config.data.tokenizer))).lower(
          abstract_params, tokens).compile()
  except jax.errors.JaxRuntimeError as error:
    raise _out_of_memory(error, setup, kind, 'eval step') from None
  print('counting FLOPs: four loop-free compiles (1 and 2 layers, 1 and 2 sequences per batch '
        'shard)', flush=True)
  summary = summarize(config)
  tokens_per_step = config.data.batch_size * config.data.seq_len
  memory, memory_source = memory_per_device(devices[0])
  report = {
      'device_kind': kind, 'devices': len(devices), 'mesh': dict(mesh.shape),
      'device_memory_bytes': memory, 'device_memory': memory_source,
      'attention_impl': attention_lib.resolve(
          config.model.attention_impl, platform=devices[0].platform, length=config.data.seq_len,
          dtype=config.model.dtype),
      'remat': config.model.remat,
      'compile_seconds': train_seconds, 'compile_cpu_seconds': train_cpu_seconds,
      'host_cores': len(os.sched_getaffinity(0)),
      'train_step': compiled_memory(train_step), 'eval_step': compiled_memory(eval_step),
      'parameter_bytes': _bytes_per_device(abstract_params),
      'optimizer_state_bytes': _bytes_per_device(setup.abstract_state['opt_state']),
      'compiled_flops_per_device': compiled_flops(config, mesh),
      'model_flops_per_device': summary['flops_per_token'] * tokens_per_step / len(devices),
      'params_total': summary['params_total'],
  }
  train = report['train_step']
  if train is not None:
    report['activation_bytes'] = train['temporaries']
    parts = {'parameters': report['parameter_bytes'],
             'optimizer state': report['optimizer_state_bytes'],
             'activations and temporaries': train['temporaries']}
    report['dominant'] = max(parts, key=parts.get)
  memory = report['device_memory_bytes']
  # Which step does not fit (experiments.eval runs the eval step with the parameters alone).
  report['too_large'] = [step for step in ('train_step', 'eval_step')
                         if memory is not None and report[step] is not None
                         and report[step]['total'] > memory]
  report['fits'] = None if memory is None or train is None else not report['too_large']
  if traffic_top:
    report['traffic'] = traffic.memory_traffic(train_step.as_text(), traffic_top)
    report['memory_bandwidth'] = device_bandwidth(kind)
  return report


def format_report(report: dict) -> str:
  gib = lambda b: ('–' if b is None else f'{b / GIB:.2f} GiB' if b >= GIB / 10
                   else f'{b / 2**20:.1f} MiB')
  memory = report['device_memory_bytes']
  lines = [f'{report["devices"]} x {report["device_kind"]}, mesh {report["mesh"]}, '
           f'{format_count(report["params_total"])} parameters; train step compiled in '
           f'{report["compile_seconds"]:.1f}s ({report["compile_cpu_seconds"]:.0f} CPU-seconds on '
           f'{report["host_cores"]} cores)',
           f'{"per device":28} {"train step":>12} {"eval step":>12}']
  for key in ('arguments', 'outputs', 'temporaries', 'total'):
    row = [report[step][key] if report[step] else None for step in ('train_step', 'eval_step')]
    lines.append(f'{key:28} {gib(row[0]):>12} {gib(row[1]):>12}')
  lines.append(f'{"device memory":28} {gib(memory):>12}   ({report["device_memory"]})')
  lines.append(f'of which parameters {gib(report["parameter_bytes"])}, optimizer state '
               f'{gib(report["optimizer_state_bytes"])}, activations and temporaries '
               f'{gib(report.get("activation_bytes"))}: {report.get("dominant", "–")} dominate')
  compiled, remat = report['compiled_flops_per_device'], report['remat']
  counted = ([] if remat == 'none' else [f'remat={remat}\'s recomputation included']) + [
      ATTENTION_IN_COMPILED_FLOPS[report['attention_impl']]]
  lines.append(f'FLOPs per step per device: compiled {compiled:.4g} ({"; ".join(counted)}), '
               f'model formula {report["model_flops_per_device"]:.4g}' if compiled
               else f'FLOPs per step per device: model formula '
               f'{report["model_flops_per_device"]:.4g} (XLA gives no count for this target)')
  if 'traffic' in report:
    lines.append(traffic.format_traffic(report['traffic'], report['memory_bandwidth'],
                                        report['device_kind']))
  return '\n'.join(lines)
