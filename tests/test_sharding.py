"""Logical-axis rules, mesh construction, and sharded training equal to one device."""

import json
import subprocess
import sys
import textwrap

import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from gated_attention import sharding
from tests import helpers


@pytest.mark.parametrize('logical, expected', [
    (('embed', 'heads', 'head_dim'), P('fsdp', 'tensor', None)),
    (('batch', 'length', 'embed'), P(('data', 'fsdp', 'expert'), None, None)),  # fsdp is taken.
    (('vocab', 'embed'), P('tensor', 'fsdp')),
    (('batch', 'length', 'vocab'), P(('data', 'fsdp', 'expert'), None, 'tensor')),
    (('expert', 'batch', None, 'embed'), P('expert', ('data', 'fsdp'), None, None)),
    (('expert', 'embed', None, 'mlp'), P('expert', 'fsdp', None, 'tensor')),
    (('embed', 'embed'), P('fsdp', None)),
    ((None, 'mlp'), P(None, 'tensor')),
])
def test_logical_rules(logical, expected):
  assert sharding.logical_to_spec(logical) == expected


def test_unknown_logical_axis_is_named():
  with pytest.raises(ValueError, match="Unknown logical axis 'rows'"):
    sharding.logical_to_spec(('rows',))


@pytest.mark.parametrize('mesh, devices, expected', [
    (dict(data=-1, fsdp=1, tensor=1, expert=1), 8, (8, 1, 1, 1)),
    (dict(data=2, fsdp=-1, tensor=2, expert=1), 8, (2, 2, 2, 1)),
    (dict(data=1, fsdp=1, tensor=1, expert=-1), 4, (1, 1, 1, 4)),
    (dict(data=1, fsdp=1, tensor=1), 1, (1, 1, 1, 1)),  # expert defaults to 1.
])
def test_mesh_shape_fills_the_minus_one(mesh, devices, expected):
  assert sharding.mesh_shape(mesh, devices) == expected


@pytest.mark.parametrize('mesh, message', [
    (dict(data=2, fsdp=2, tensor=1), 'the product 4 must equal the device count 8'),
    (dict(data=3, fsdp=-1, tensor=1), 'their product 3 must divide the device count'),
    (dict(data=-1, fsdp=-1, tensor=1), 'at most one -1'),
])
def test_bad_meshes_are_named(mesh, message):
  with pytest.raises(ValueError, match=message):
    sharding.mesh_shape(mesh, 8)


def test_uneven_parameter_split_is_named():
  mesh = sharding.make_mesh(dict(data=1, fsdp=1, tensor=1), jax.devices()[:1])
  sharding.named_sharding(mesh, ('embed', 'heads'), (6, 4), name='wq')  # One device: fine.
  mesh = jax.sharding.AbstractMesh((1, 1, 4, 1), sharding.MESH_AXES)
  with pytest.raises(ValueError, match="wq dimension 'heads' of size 6 cannot be split 4 ways"):
    sharding.named_sharding(mesh, ('embed', 'heads'), (8, 6), name='wq')


_SHARDED_RUN = textwrap.dedent('''
    import json, sys
    import jax
    from gated_attention import sharding
    from gated_attention.evaluate import load_params
    from gated_attention.metrics import read_metrics
    from gated_attention.train import train
    from tests import helpers
    mesh_config, overrides, workdir = json.loads(sys.argv[1]), json.loads(sys.argv[2]), sys.argv[3]
    config = helpers.run_config(steps=3)
    config.model.update(num_heads=4, num_kv_heads=4)
    config.update_from_flattened_dict(overrides)
    config.mesh.update(mesh_config)
    train(config, workdir)
    _, params, _ = load_params(workdir, config, sharding.make_mesh(config.mesh))
    layer = params['blocks'][0]
    shapes = {'wq': layer['attention']['wq'], 'wk': layer['attention']['wk'],
              'mlp_wi': layer['mlp']['wi']}
    print(json.dumps({'losses': [r['loss'] for r in read_metrics(workdir)],
                      **{k: v.sharding.shard_shape(v.shape) for k, v in shapes.items()},
                      'devices': jax.device_count()}))
''')


def _run_sharded(mesh_config, workdir, devices, overrides=None):
  """Trains helpers.run_config (4 heads, 4 KV heads) with `overrides` ({'model.x': value})
  on `devices` CPU devices in a fresh process; returns its losses and parameter shard shapes."""
  result = subprocess.run([sys.executable, '-c', _SHARDED_RUN, json.dumps(mesh_config),
                           json.dumps(overrides or {}), str(workdir)],
                          capture_output=True, text=True, timeout=300, env=helpers.env(devices))
  assert result.returncode == 0, result.stderr[-3000:]
  return json.loads(result.stdout.strip().splitlines()[-1])


def test_sharded_training_matches_one_device(tmp_path):
  single = _run_sharded(dict(data=1, fsdp=1, tensor=1), tmp_path / 'single', devices=1)
  # wq is [d_model 32, heads 4, head_dim 8 + gate 8]: embed over fsdp, heads over tensor.
  # Data parallelism is in 'mixed' and 'tensor'.
  for name, mesh_config, wq_shard_shape in [
      ('fsdp', dict(data=1, fsdp=8, tensor=1), [4, 4, 16]),
      ('mixed', dict(data=2, fsdp=2, tensor=2), [16, 2, 16]),
      ('tensor', dict(data=2, fsdp=1, tensor=4), [32, 1, 16]),
  ]:
    # One product per KV head group under tensor=4 (it splits the 4 KV heads); separate ones
    # elsewhere.
    sharded = _run_sharded(mesh_config, tmp_path / name, devices=8,
                           overrides={'model.fused_projections': name == 'tensor'})
    assert sharded['devices'] == 8
    assert sharded['wq'] == wq_shard_shape, name
    np.testing.assert_allclose(sharded['losses'], single['losses'], rtol=2e-5, err_msg=name)


def test_tensor_parallelism_past_the_kv_heads_and_the_kernels_match_one_device(tmp_path):
  """tensor=4 over 2 KV heads: the KV projections are replicated over the tensor shards that
  share a KV head; the splash kernel (interpret mode here) and the CPU kernel run per shard
  under shard_map."""
  model = {'model.num_kv_heads': 2, 'model.attention_impl': 'xla', 'data.seq_len': 128}
  single = _run_sharded(dict(data=1, fsdp=1, tensor=1), tmp_path / 'single', 1, model)
  for name, impl in [('xla', 'xla'), ('splash', 'splash'), ('cpu_flash', 'cpu_flash')]:
    # With fused projections asked for, the query's product stays apart from the replicated KV.
    sharded = _run_sharded(dict(data=2, fsdp=1, tensor=4), tmp_path / name, 8,
                           {**model, 'model.attention_impl': impl,
                            'model.fused_projections': impl == 'splash'})
    assert sharded['wq'] == [32, 1, 16] and sharded['wk'] == [32, 2, 8], name  # wk: whole.
    np.testing.assert_allclose(sharded['losses'], single['losses'], rtol=2e-5, err_msg=name)


def test_expert_sharded_moe_matches_one_device(tmp_path):
  moe = dict(num_experts=8, top_k=2, expert_mlp_dim=32, capacity_factor=0.0)
  moe = {f'model.moe.{key}': value for key, value in moe.items()}
  single = _run_sharded(dict(data=1, fsdp=1, tensor=1, expert=1), tmp_path / 'single', 1, moe)
  # Expert kernels are [experts 8, d_model 32, 2, expert_mlp_dim 32]. The batch is split over
  # the expert axis too, so 'expert' and 'all' both run expert with data parallelism.
  for name, mesh_config, wi_shard_shape, impl in [
      ('expert', dict(data=1, fsdp=1, tensor=1, expert=8), [1, 32, 2, 32], 'capacity'),
      ('all', dict(data=1, fsdp=2, tensor=2, expert=2), [4, 16, 2, 16], 'capacity'),
      ('ragged', dict(data=1, fsdp=2, tensor=2, expert=2), [4, 16, 2, 16], 'ragged'),
  ]:
    sharded = _run_sharded(mesh_config, tmp_path / name, 8, {**moe, 'model.moe.impl': impl})
    assert sharded['mlp_wi'] == wi_shard_shape, name
    np.testing.assert_allclose(sharded['losses'], single['losses'], rtol=2e-5, err_msg=name)



_ALL_GATHERS = textwrap.dedent('''
    import json, re, sys
    from gated_attention import sharding
    from gated_attention.train import compile_train_step, setup_train_state
    from tests import helpers
    config = helpers.run_config()
    config.update_from_flattened_dict(json.loads(sys.argv[1]))
    setup = setup_train_state(config, sharding.make_mesh(config.mesh))
    text = compile_train_step(config, setup).as_text()
    print(json.dumps([[int(d) for d in dims.split(',')] for dims in
                      re.findall(r'= \\w+\\[([\\d,]+)\\][^ ]* all-gather', text)]))
''')


def _all_gather_shapes(overrides: dict) -> list[list[int]]:
  """The result shapes of every all-gather in helpers.run_config's train step with `overrides`
  ({'mesh.data': 2, ...}), compiled for 8 CPU devices in a fresh process."""
  result = subprocess.run([sys.executable, '-c', _ALL_GATHERS, json.dumps(overrides)],
                          capture_output=True, text=True, timeout=300, env=helpers.env(8))
  assert result.returncode == 0, result.stderr[-3000:]
  return json.loads(result.stdout.strip().splitlines()[-1])


_COLLECTIVES = textwrap.dedent('''
    import collections, json, re, sys
    from gated_attention import sharding
    from gated_attention.train import compile_train_step, setup_train_state
    from tests import helpers
    counts = []
    for kv_heads, fused in json.loads(sys.argv[1]):
      config = helpers.run_config()
      config.model.update(num_heads=4, num_kv_heads=kv_heads, fused_projections=fused)
      config.mesh.update(data=1, fsdp=2, tensor=4)
      text = compile_train_step(config, setup_train_state(
          config, sharding.make_mesh(config.mesh))).as_text()
      counts.append(collections.Counter(re.findall(
          r' (all-gather|all-reduce|reduce-scatter|collective-permute|all-to-all)\\(', text)))
    print(json.dumps(counts))
''')


@pytest.mark.parametrize('kv_heads', [4, 2])
def test_fused_projections_add_no_collective_on_a_tensor_parallel_mesh(kv_heads):
  """On fsdp=2 x tensor=4 the fused kernels (grouped by KV head; with 2 KV heads the query's
  product stays apart) are split the way their parts are: no collective is added to reshard
  them, and the FSDP gathers of the parts become fewer, larger ones."""
  result = subprocess.run([sys.executable, '-c', _COLLECTIVES,
                           json.dumps([[kv_heads, False], [kv_heads, True]])],
                          capture_output=True, text=True, timeout=300, env=helpers.env(8))
  assert result.returncode == 0, result.stderr[-3000:]
  separate, fused = json.loads(result.stdout.strip().splitlines()[-1])
  assert all(fused.get(kind, 0) <= count for kind, count in separate.items()), (separate, fused)
  assert set(fused) <= set(separate) and fused['all-gather'] < separate['all-gather']


def test_capacity_experts_run_where_they_live_on_their_share_of_the_batch():
  """On data=2 x expert=4 the capacity MoE's compiled step gathers neither the global batch's
  expert buffers ([experts 8, batch 16, ...]) nor every expert's weights ([8, 40, 32])."""
  gathered = _all_gather_shapes({
      'model.moe.num_experts': 8, 'model.moe.top_k': 2, 'model.moe.expert_mlp_dim': 40,
      'model.moe.capacity_factor': 1.25, 'data.batch_size': 16, 'data.seq_len': 24,
      'mesh.data': 2, 'mesh.expert': 4})
  assert gathered  # The parse finds all-gathers (the batch's activations over experts).
  assert not [dims for dims in gathered if dims[:2] == [8, 16] or dims == [8, 40, 32]], gathered


def test_the_embedding_lookup_gathers_nothing_across_the_data_axis():
  """On data=2 x fsdp=4 the lookup stays within each data shard: nothing of the global batch
  (32 x 24 tokens) is gathered onto every device (the backward pass gathered its [32, 24, 8]
  activations, across slices where `data` spans them)."""
  gathered = _all_gather_shapes({'data.batch_size': 32, 'data.seq_len': 24, 'mesh.data': 2,
                                 'mesh.fsdp': 4})
  assert [32, 384] in gathered  # The parse finds FSDP's gathers: the embedding table's.
  assert not [dims for dims in gathered if dims[:2] == [32, 24]], gathered
