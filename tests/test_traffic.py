"""The bytes each op of a compiled program moves: counted by hand on a written program, and on
programs XLA compiles here against what their ops must touch."""

import jax
import jax.numpy as jnp
import pytest

from gated_attention import traffic

# A loop of 4 that slices a stacked float32 weight and writes its negation into a stacked
# bfloat16 buffer in place, then an elementwise fusion and a cuBLAS product.
PROGRAM = """HloModule jit_step, entry_computation_layout={()->()}

%fused_slice (param_0: f32[4,256,128], param_1: s32[]) -> bf16[256,128] {
  %param_0 = f32[4,256,128]{2,1,0} parameter(0)
  %param_1 = s32[] parameter(1)
  %constant.1 = s32[] constant(0)
  %dynamic-slice.1 = f32[1,256,128]{2,1,0} dynamic-slice(%param_0, %param_1, %constant.1, %constant.1), dynamic_slice_sizes={1,256,128}
  %bitcast.1 = f32[256,128]{1,0} bitcast(%dynamic-slice.1)
  ROOT %convert.1 = bf16[256,128]{1,0} convert(%bitcast.1)
}

%fused_update (param_0.2: bf16[4,256,128], param_1.2: bf16[256,128], param_2.2: s32[]) -> bf16[4,256,128] {
  %param_0.2 = bf16[4,256,128]{2,1,0} parameter(0)
  %param_1.2 = bf16[256,128]{1,0} parameter(1)
  %negate.2 = bf16[256,128]{1,0} negate(%param_1.2)
  %bitcast.2 = bf16[1,256,128]{2,1,0} bitcast(%negate.2)
  %param_2.2 = s32[] parameter(2)
  %constant.2 = s32[] constant(0)
  ROOT %dynamic-update-slice.2 = bf16[4,256,128]{2,1,0} dynamic-update-slice(%param_0.2, %bitcast.2, %param_2.2, %constant.2, %constant.2)
}

%fused_add (param_0.3: f32[64,32], param_1.3: f32[64,32]) -> f32[64,32] {
  %param_0.3 = f32[64,32]{1,0} parameter(0)
  %param_1.3 = f32[64,32]{1,0} parameter(1)
  ROOT %add.3 = f32[64,32]{1,0} add(%param_0.3, %param_1.3)
}

%body (arg: (s32[], f32[4,256,128], bf16[4,256,128])) -> (s32[], f32[4,256,128], bf16[4,256,128]) {
  %arg = (s32[], f32[4,256,128]{2,1,0}, bf16[4,256,128]{2,1,0}) parameter(0)
  %i = s32[] get-tuple-element(%arg), index=0
  %w = f32[4,256,128]{2,1,0} get-tuple-element(%arg), index=1
  %buf = bf16[4,256,128]{2,1,0} get-tuple-element(%arg), index=2
  %slice_fusion = bf16[256,128]{1,0} fusion(%w, %i), kind=kLoop, calls=%fused_slice, metadata={op_name="jit(step)/while/body/dynamic_slice"}
  %update_fusion = bf16[4,256,128]{2,1,0} fusion(%buf, %slice_fusion, %i), kind=kLoop, calls=%fused_update
  %one = s32[] constant(1)
  %next = s32[] add(%i, %one)
  ROOT %tuple.1 = (s32[], f32[4,256,128]{2,1,0}, bf16[4,256,128]{2,1,0}) tuple(%next, %w, %update_fusion)
}

%cond (arg.c: (s32[], f32[4,256,128], bf16[4,256,128])) -> pred[] {
  %arg.c = (s32[], f32[4,256,128]{2,1,0}, bf16[4,256,128]{2,1,0}) parameter(0)
  %i.c = s32[] get-tuple-element(%arg.c), index=0
  %n = s32[] constant(4)
  ROOT %lt = pred[] compare(%i.c, %n), direction=LT
}

ENTRY %main (p0: f32[4,256,128], p1: bf16[4,256,128], p2: f32[64,32], p3: f32[32,64]) -> f32[64,64] {
  %p0 = f32[4,256,128]{2,1,0} parameter(0)
  %p1 = bf16[4,256,128]{2,1,0} parameter(1)
  %p2 = f32[64,32]{1,0} parameter(2)
  %p3 = f32[32,64]{1,0} parameter(3)
  %zero = s32[] constant(0)
  %init = (s32[], f32[4,256,128]{2,1,0}, bf16[4,256,128]{2,1,0}) tuple(%zero, %p0, %p1)
  %while = (s32[], f32[4,256,128]{2,1,0}, bf16[4,256,128]{2,1,0}) while(%init), condition=%cond, body=%body, backend_config={"known_trip_count":{"n":"4"}}
  %add_fusion = f32[64,32]{1,0} fusion(%p2, %p2), kind=kLoop, calls=%fused_add
  ROOT %gemm = f32[64,64]{1,0} custom-call(%add_fusion, %p3), custom_call_target="__cublas$gemm"
}
"""


def test_a_written_program_counts_what_each_op_touches():
  result = traffic.memory_traffic(PROGRAM, top=10)
  moved = {op['name']: (op['bytes'], op['executions']) for op in result['top_ops']}
  # The slice it reads of the float32 weight, the loop counter, its bfloat16 copy; 4 times.
  assert moved['slice_fusion'] == (4 * (256 * 128 * 4 + 4 + 256 * 128 * 2), 4)
  # The bfloat16 slice it reads, the loop counter, the update written in place: the stacked
  # buffer itself is neither read nor rewritten whole.
  assert moved['update_fusion'] == (4 * (256 * 128 * 2 + 4 + 256 * 128 * 2), 4)
  assert moved['next'] == (4 * (4 + 4 + 4), 4)
  assert moved['lt'] == (4 * (4 + 4 + 1), 4)  # The condition, once per iteration too.
  assert moved['add_fusion'] == (3 * 64 * 32 * 4, 1)
  assert moved['gemm'] == ((64 * 32 + 32 * 64 + 64 * 64) * 4, 1)
  assert result['bytes'] == sum(bytes_ for bytes_, _ in moved.values())
  assert result['categories_bytes']['matmul'] == moved['gemm'][0]
  assert result['loops_without_trip_count'] == 0
  assert len(moved) == 6  # Parameters, constants, tuples and the loop move nothing.


# An update into a buffer the fusion makes itself (written whole), an async all-gather, a fusion
# that gathers 8 rows of a table, and a TPU's prefetch of an array into its on-chip memory.
FRESH_AND_ASYNC = """HloModule jit_gather, entry_computation_layout={()->()}

%fused_fresh (param_0.4: bf16[256,128], param_1.4: s32[]) -> bf16[4,256,128] {
  %param_0.4 = bf16[256,128]{1,0} parameter(0)
  %zero.4 = bf16[] constant(0)
  %buffer.4 = bf16[4,256,128]{2,1,0} broadcast(%zero.4), dimensions={}
  %bitcast.4 = bf16[1,256,128]{2,1,0} bitcast(%param_0.4)
  %param_1.4 = s32[] parameter(1)
  %c.4 = s32[] constant(0)
  ROOT %dus.4 = bf16[4,256,128]{2,1,0} dynamic-update-slice(%buffer.4, %bitcast.4, %param_1.4, %c.4, %c.4)
}

%fused_take (param_0.5: f32[1024,128], param_1.5: s32[8,1]) -> f32[8,128] {
  %param_0.5 = f32[1024,128]{1,0} parameter(0)
  %param_1.5 = s32[8,1]{1,0} parameter(1)
  %gather.5 = f32[8,128]{1,0} gather(%param_0.5, %param_1.5), offset_dims={1}, collapsed_slice_dims={0}, start_index_map={0}, index_vector_dim=1, slice_sizes={1,128}
  ROOT %exp.5 = f32[8,128]{1,0} exponential(%gather.5)
}

ENTRY %main (p: bf16[256,128], i: s32[], table: f32[1024,128], ids: s32[8,1]) -> (bf16[4,256,128], bf16[1024,128], f32[8,128]) {
  %p = bf16[256,128]{1,0} parameter(0)
  %i = s32[] parameter(1)
  %table = f32[1024,128]{1,0} parameter(2)
  %ids = s32[8,1]{1,0} parameter(3)
  %fresh = bf16[4,256,128]{2,1,0} fusion(%p, %i), kind=kLoop, calls=%fused_fresh
  %take = f32[8,128]{1,0} fusion(%table, %ids), kind=kLoop, calls=%fused_take
  %ag-start = (bf16[256,128]{1,0}, bf16[1024,128]{1,0}) all-gather-start(%p), dimensions={0}, replica_groups={{0,1,2,3}}
  %ag-done = bf16[1024,128]{1,0} all-gather-done(%ag-start)
  %prefetch-start = (bf16[256,128]{1,0}, bf16[256,128]{1,0:T(8,128)(2,1)S(1)}, u32[]) copy-start(%p)
  %prefetch-done = bf16[256,128]{1,0:T(8,128)(2,1)S(1)} copy-done(%prefetch-start)
  ROOT %out = (bf16[4,256,128]{2,1,0}, bf16[1024,128]{1,0}, f32[8,128]{1,0}, bf16[256,128]{1,0:T(8,128)(2,1)S(1)}) tuple(%fresh, %ag-done, %take, %prefetch-done)
}
"""


def test_new_buffers_async_ops_gathers_and_on_chip_memory():
  result = traffic.memory_traffic(FRESH_AND_ASYNC)
  moved = {op['name']: op['bytes'] for op in result['top_ops']}
  assert moved == {'fresh': 256 * 128 * 2 + 4 + 4 * 256 * 128 * 2,
                   'ag-done': 256 * 128 * 2 + 1024 * 128 * 2,
                   'take': 8 * 128 * 4 + 8 * 4 + 8 * 128 * 4,  # The rows it takes, not the table.
                   'prefetch-done': 256 * 128 * 2}  # Read from HBM into on-chip memory (S(1)).
  assert result['categories_bytes']['collective'] == moved['ag-done']


def test_text_that_is_not_a_whole_program_is_refused_naming_what_is_missing():
  with pytest.raises(ValueError, match='no ENTRY computation'):
    traffic.memory_traffic(PROGRAM.replace('ENTRY %main', '%main'))
  with pytest.raises(ValueError, match=r"add_fusion names operands .* \['p9'\]"):
    traffic.memory_traffic(PROGRAM.replace('fusion(%p2, %p2)', 'fusion(%p2, %p9)'))
  with pytest.raises(ValueError, match='fusion add_fusion calls no computation'):
    traffic.memory_traffic(PROGRAM.replace('calls=%fused_add', 'calls=%fused_gone'))


def test_a_loop_without_the_compilers_count_is_counted_from_its_condition_or_else_once():
  """XLA:TPU gives no trip count: `i < 4` from 0 by 1 is read from the loop itself; a loop
  whose condition is not of that form counts once, and the result says how many did."""
  no_count = PROGRAM.replace(', backend_config={"known_trip_count":{"n":"4"}}', '')
  read = traffic.memory_traffic(no_count, top=10)
  assert read['loops_without_trip_count'] == 0
  assert {op['name']: op['executions'] for op in read['top_ops']}['slice_fusion'] == 4
  assert read['bytes'] == traffic.memory_traffic(PROGRAM, top=10)['bytes']
  # From 1 by 2 below 4: i = 1, 3.
  odd = (no_count.replace('%zero = s32[] constant(0)', '%zero = s32[] constant(1)')
         .replace('%one = s32[] constant(1)', '%one = s32[] constant(2)'))
  assert {op['executions'] for op in traffic.memory_traffic(odd)['top_ops']} >= {2}
  unknown = traffic.memory_traffic(no_count.replace('direction=LT', 'direction=NE'))
  assert unknown['loops_without_trip_count'] == 1
  assert {op['executions'] for op in unknown['top_ops']} == {1}


def test_an_elementwise_program_reads_its_operands_and_writes_its_result_once():
  x = jnp.ones((256, 256), jnp.float32)
  program = jax.jit(lambda a, b: a * b + 1.0).lower(x, x).compile().as_text()
  assert traffic.memory_traffic(program)['bytes'] == 3 * x.nbytes


@pytest.mark.parametrize('layers', [6, 12])
def test_a_scan_over_stacked_weights_reads_one_layer_per_iteration(layers):
  """Each iteration touches one [64, 64] layer of the stacked weights (XLA:CPU slices it into a
  buffer, 2 passes, that its product reads), never the whole stack (at least 6 layers)."""
  def step(weights, h):
    return jax.lax.scan(lambda h, w: (jnp.tanh(h @ w), None), h, weights)[0]
  weights, h = jnp.ones((layers, 64, 64)), jnp.ones((8, 64))
  result = traffic.memory_traffic(jax.jit(step).lower(weights, h).compile().as_text(), top=50)
  products = [op for op in result['top_ops'] if op['category'] == 'matmul']
  assert products and all(op['executions'] == layers for op in products)
  layer = weights.nbytes // layers
  per_iteration = result['bytes'] / layers
  assert 3 * layer <= per_iteration < 4 * layer + 8 * h.nbytes < weights.nbytes


def test_the_table_gives_the_time_at_the_bandwidth_only_where_it_is_known():
  result = traffic.memory_traffic(PROGRAM)
  table = traffic.format_traffic(result, 1e9, 'chip of 1 GB/s')
  assert f'(at the 0.001 TB/s of a chip of 1 GB/s: {result["bytes"] / 1e9 * 1e3:.1f} ms)' in table
  assert 'update_fusion' in table and 'loop(s) without' not in table
  assert 'ms)' not in traffic.format_traffic(result, None, 'cpu')
