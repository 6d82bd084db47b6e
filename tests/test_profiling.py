"""Where a step's time goes: the compiled program's instructions put in categories by what they
hold, trace events joined to them by name (CPU and device layouts of a trace), and a real
trace of a real step on this machine."""

import gzip
import json
import time

import pytest

from gated_attention import benchmark, profiling
from tests import helpers
from tests.helpers import run_config

# A compiled program's text as XLA prints it (hand-written, trimmed): fusions call computations,
# the while loop's body holds a collective, custom calls name their targets (Pallas kernels on
# TPUs share one target and are named after the kernel).
PROGRAM = '''HloModule jit_step, is_scheduled=true, entry_computation_layout={(f32[8,8]{1,0})->f32[]}

%fused_dot (param_0: f32[8,8], param_1: f32[8,8]) -> f32[8,8] {
  %param_0 = f32[8,8]{1,0} parameter(0)
  %param_1 = f32[8,8]{1,0} parameter(1)
  %dot.1 = f32[8,8]{1,0} dot(%param_0, %param_1), lhs_contracting_dims={1}, rhs_contracting_dims={0}
  ROOT %tanh.1 = f32[8,8]{1,0} tanh(%dot.1)
}

%fused_move (param_0.2: f32[8,8]) -> f32[8,8] {
  %param_0.2 = f32[8,8]{1,0} parameter(0)
  %transpose.1 = f32[8,8]{0,1} transpose(%param_0.2), dimensions={1,0}
  ROOT %copy.1 = f32[8,8]{1,0} copy(%transpose.1)
}

%region_add (a: f32[], b: f32[]) -> f32[] {
  %a = f32[] parameter(0)
  %b = f32[] parameter(1)
  ROOT %add.1 = f32[] add(%a, %b)
}

%fused_reduce (param_0.3: f32[8,8]) -> f32[] {
  %param_0.3 = f32[8,8]{1,0} parameter(0)
  %exponential.1 = f32[8,8]{1,0} exponential(%param_0.3)
  %constant.1 = f32[] constant(0)
  ROOT %reduce.1 = f32[] reduce(%exponential.1, %constant.1), dimensions={0,1}, to_apply=%region_add
}

%body (p: (s32[], f32[8,8])) -> (s32[], f32[8,8]) {
  %p = (s32[], f32[8,8]{1,0}) parameter(0)
  %gte.1 = f32[8,8]{1,0} get-tuple-element(%p), index=1
  %all-reduce-start.1 = f32[8,8]{1,0} all-reduce-start(%gte.1), replica_groups={}, to_apply=%region_add
  %all-reduce-done.1 = f32[8,8]{1,0} all-reduce-done(%all-reduce-start.1)
  %gte.0 = s32[] get-tuple-element(%p), index=0
  ROOT %tuple.1 = (s32[], f32[8,8]{1,0}) tuple(%gte.0, %all-reduce-done.1)
}

%condition (p.1: (s32[], f32[8,8])) -> pred[] {
  %p.1 = (s32[], f32[8,8]{1,0}) parameter(0)
  ROOT %constant.2 = pred[] constant(false)
}

%gathering (param_0.4: f32[8,8]) -> f32[64,8] {
  %param_0.4 = f32[8,8]{1,0} parameter(0)
  ROOT %all-gather.1 = f32[64,8]{1,0} all-gather(%param_0.4), dimensions={0}
}

ENTRY %main.9 (x: f32[8,8]) -> f32[] {
  %x = f32[8,8]{1,0} parameter(0)
  %matmul_fusion = f32[8,8]{1,0} fusion(%x, %x), kind=kCustom, calls=%fused_dot, metadata={op_name="jit(step)/dot_general"}
  %move_fusion = f32[8,8]{1,0} fusion(%matmul_fusion), kind=kLoop, calls=%fused_move
  %cublas-gemm.1 = (f32[8,8]{1,0}, s8[4]{0}) custom-call(%move_fusion, %x), custom_call_target="__cublas$gemm"
  %gte.2 = f32[8,8]{1,0} get-tuple-element(%cublas-gemm.1), index=0
  %fmha.1 = (f32[8,8]{1,0}, u8[0]{0}) custom-call(%gte.2, %gte.2, %gte.2), custom_call_target="__cudnn$fmhaSoftmax"
  %gte.3 = f32[8,8]{1,0} get-tuple-element(%fmha.1), index=0
  %splash_mha_fwd.1 = f32[8,8]{1,0:T(8,128)} custom-call(%gte.3), custom_call_target="tpu_custom_call"
  %gmm.1 = f32[8,8]{1,0} custom-call(%gte.3, %x), custom_call_target="tpu_custom_call"
  %zero = s32[] constant(0)
  %init = (s32[], f32[8,8]{1,0}) tuple(%zero, %gte.3)
  %while.1 = (s32[], f32[8,8]{1,0}) while(%init), condition=%condition, body=%body
  %gte.4 = f32[8,8]{1,0} get-tuple-element(%while.1), index=1
  %async-start.1 = ((f32[8,8]{1,0}), f32[64,8]{1,0}) async-start(%gte.4), calls=%gathering
  %async-done.1 = f32[64,8]{1,0} async-done(%async-start.1), calls=%gathering
  %sort.1 = f32[8,8]{1,0} sort(%gte.4), dimensions={1}, to_apply=%region_add
  ROOT %reduce_fusion = f32[] fusion(%sort.1), kind=kInput, calls=%fused_reduce
}
'''


def test_program_ops_put_each_instruction_in_the_category_of_what_it_holds():
  ops = profiling.program_ops(PROGRAM)
  expected = {'matmul_fusion': 'matmul', 'cublas-gemm.1': 'matmul', 'move_fusion': 'data movement',
              'fmha.1': 'attention', 'all-reduce-start.1': 'collective',
              'all-reduce-done.1': 'collective', 'while.1': 'control', 'sort.1': 'other',
              'reduce_fusion': 'other fusion', 'dot.1': 'matmul', 'gte.2': 'data movement',
              'splash_mha_fwd.1': 'attention', 'gmm.1': 'matmul',
              'async-start.1': 'collective', 'async-done.1': 'collective'}
  assert {name: ops[name].category for name in expected} == expected
  assert ops['matmul_fusion'].shape == 'f32[8,8]'
  assert ops['matmul_fusion'].source == 'dot_general'
  assert ops['cublas-gemm.1'].shape == '(f32[8,8], s8[4])'
  assert 'main.9' not in ops and 'body' not in ops  # Computations are not instructions.


def _metadata(pid, name, tid=None):
  event = {'ph': 'M', 'pid': pid, 'name': 'thread_name' if tid is not None else 'process_name',
           'args': {'name': name}}
  return event if tid is None else dict(event, tid=tid)


def _event(pid, tid, name, microseconds, **args):
  return {'ph': 'X', 'pid': pid, 'tid': tid, 'ts': 0.0, 'dur': microseconds, 'name': name,
          'args': args}


def test_op_times_read_the_host_thunks_of_a_cpu_trace_by_their_instruction():
  """XLA:CPU's thunks name their instruction and program in `hlo_op` and `hlo_module`; the
  runtime's own events, and another program's ops of the same names, do not count."""
  mine = {'hlo_module': 'jit_step'}
  events = [_metadata(7, '/host:CPU'), _metadata(7, 'tf_XLAEigen', tid=1),
            _event(7, 1, 'matmul_fusion', 300.0, hlo_op='matmul_fusion', **mine),
            _event(7, 2, 'matmul_fusion', 100.0, hlo_op='matmul_fusion', **mine),
            _event(7, 2, 'sort.1', 50.0, hlo_op='sort.1', **mine),
            _event(7, 1, 'end: sort.1', 9.0),
            _event(7, 1, 'sort.1', 70.0, hlo_op='sort.1', hlo_module='jit_other'),
            _event(7, 1, 'PjitFunction(step)', 10_000.0)]
  times = profiling.op_times(events, profiling.program_ops(PROGRAM), module='jit_step')
  assert times == {'matmul_fusion': pytest.approx(400e-6), 'sort.1': pytest.approx(50e-6)}
  # Two CPU devices in one process (their thunks name their ordinal): the mean of the two.
  second = [_event(7, 3, 'matmul_fusion', 200.0, hlo_op='matmul_fusion', device_ordinal='1',
                   **mine), _event(7, 3, 'sort.1', 150.0, hlo_op='sort.1', device_ordinal='1',
                                   **mine)]
  first = [dict(event, args=dict(event['args'], device_ordinal='0')) if event.get('args') else
           event for event in events]
  times = profiling.op_times(first + second, profiling.program_ops(PROGRAM), module='jit_step')
  assert times == {'matmul_fusion': pytest.approx(300e-6), 'sort.1': pytest.approx(100e-6)}


def test_op_times_read_a_device_by_its_op_lines_else_its_kernels():
  """A GPU trace as jax writes it holds kernels on streams, each naming its instruction in
  `hlo_op` (copies and the tracer's events name none); XProf's adds `XLA Ops` lines, one per
  stream, holding each op again: those lines alone count then. The host's events of the same
  names (launches) never count where there is a device, nor do SparseCores', nor kernels of
  another program (by `hlo_module`)."""
  ops = profiling.program_ops(PROGRAM)
  device = [_metadata(1, '/device:GPU:0'), _metadata(1, 'Stream #13(Kernel)', tid=13),
            _event(1, 13, 'sm90_xmma_gemm_bf16', 70.0, hlo_op='matmul_fusion'),
            _event(1, 13, 'sm90_xmma_gemm_bf16', 30.0, hlo_op='7::matmul_fusion'),
            _event(1, 13, 'cudnn_fmha_kernel', 20.0, hlo_op='fmha.1'),
            _event(1, 13, 'sort.1', 500.0),  # No hlo_op: not an op's kernel, whatever its name.
            _event(1, 13, 'other_gemm', 800.0, hlo_op='matmul_fusion', hlo_module='jit_other'),
            _metadata(1, 'Stream #20(MemcpyD2H)', tid=20), _event(1, 20, 'MemcpyD2H', 40.0),
            _metadata(2, '/host:CPU'), _event(2, 5, 'matmul_fusion', 5.0),
            _metadata(4, '/device:TPU:0 SparseCore 0'), _event(4, 1, 'fmha.1', 9.0)]
  by_kernel = profiling.op_times(device, ops, module='jit_step')
  assert by_kernel == {'matmul_fusion': pytest.approx(100e-6), 'fmha.1': pytest.approx(20e-6)}
  op_lines = [_metadata(1, 'XLA Ops - from #13', tid=99), _event(1, 99, 'matmul_fusion', 110.0),
              _event(1, 99, 'fmha.1', 21.0)]
  assert profiling.op_times(device + op_lines, ops, module='jit_step') == {
      'matmul_fusion': pytest.approx(110e-6), 'fmha.1': pytest.approx(21e-6)}
  # A second device running the same program: each op's time is the devices' mean.
  second = [_metadata(3, '/device:GPU:1'), _metadata(3, 'XLA Ops', tid=99),
            _event(3, 99, 'matmul_fusion', 90.0), _event(3, 99, 'fmha.1', 19.0)]
  assert profiling.op_times(device + op_lines + second, ops, module='jit_step') == {
      'matmul_fusion': pytest.approx(100e-6), 'fmha.1': pytest.approx(20e-6)}


def test_summarize_sums_categories_per_step_and_leaves_loops_out():
  ops = profiling.program_ops(PROGRAM)
  times = {'matmul_fusion': 0.4, 'cublas-gemm.1': 0.2, 'fmha.1': 0.1, 'while.1': 5.0,
           'all-reduce-start.1': 0.06, 'sort.1': 0.02}
  summary = profiling.summarize(times, ops, steps=2, step_time_s=0.5, top=3)
  assert summary['categories_s'] == pytest.approx(
      {'matmul': 0.3, 'attention': 0.05, 'collective': 0.03, 'data movement': 0.0,
       'other fusion': 0.0, 'other': 0.01})
  assert summary['op_time_s'] == pytest.approx(0.39)
  assert [op['name'] for op in summary['top_ops']] == ['matmul_fusion', 'cublas-gemm.1', 'fmha.1']
  assert summary['top_ops'][0]['time_s'] == pytest.approx(0.2)


def test_a_traced_train_step_on_this_machine_joins_its_ops_to_the_program(tmp_path):
  """The installed jax's real trace of a real step: its ops are found in the compiled program,
  the matmuls and the attention kernel among them, and their time is about the step's: no more
  than every thread busy for the whole step, and most of it (a join that missed most ops, or
  counted them twice, fails)."""
  config = run_config(gate='g1_elementwise')
  # Ops of a few milliseconds a step, so that the runtime's own gaps between them (tens of
  # microseconds each) stay a small part of it on a loaded machine too.
  config.model.update(num_layers=1, d_model=64, mlp_dim=128)
  config.data.seq_len = 128
  result = benchmark.benchmark_train_step(config, steps=1, trials=1, profile_steps=2,
                                          profile_dir=tmp_path / 'trace')
  profile = result['profile']
  assert profile['steps'] == 2
  categories = profile['categories_s']
  assert categories['matmul'] > 0
  assert categories['attention'] > 0  # cpu_flash's kernel, a custom call (auto on this CPU).
  assert (0.25 * profile['step_time_s'] < profile['op_time_s']
          < helpers.busy_threads_at_most() * profile['step_time_s'])
  assert {op['category'] for op in profile['top_ops']} <= set(profiling.CATEGORIES)
  assert list((tmp_path / 'trace').rglob('perfetto_trace.json.gz'))


def test_a_trace_with_no_op_of_the_program_is_an_error_not_an_empty_summary(tmp_path):
  """No trace written since the profile started, or one whose events name no op of the program
  outside its loops: an error, never a table of zeros."""
  folder = tmp_path / 'plugins' / 'profile' / 'run'
  folder.mkdir(parents=True)
  with gzip.open(folder / 'perfetto_trace.json.gz', 'wt') as file:
    json.dump({'traceEvents': [
        _metadata(7, '/host:CPU'), _event(7, 1, 'fusion.999', 5.0, hlo_op='fusion.999'),
        _event(7, 1, 'while.1', 5.0, hlo_op='while.1'), {}]}, file)
  with pytest.raises(profiling.ProfileError, match='none of the 4 events .* names an op'):
    profiling.summarize_trace(tmp_path, PROGRAM, steps=1, step_time_s=0.1, since=0.0)
  with pytest.raises(profiling.ProfileError, match='written by this trace'):
    profiling.summarize_trace(tmp_path, PROGRAM, steps=1, step_time_s=0.1,
                              since=time.time() + 60)
