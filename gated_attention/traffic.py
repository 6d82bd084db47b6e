"""The bytes each op of a compiled step reads and writes, counted from the compiled program alone:
what bounds the time of everything that is not a matrix product (an op that moves B bytes takes
at least B / bandwidth), known before the step runs, for chips this host does not have
(`experiments.compile_only --traffic`).

An op moves its operands and its result as compiled, except what it does not touch:
- an operand that a fusion only slices (dynamic-slice, slice; through bitcasts) moves its slices;
- a dynamic-update-slice (alone or at a fusion's root) writes its update in place: its buffer
  moves nothing, its result the update;
- a loop's body and condition run its known trip count of times (scanned layers, microbatches,
  loss chunks), once where the compiler knows none;
- a conditional's branches each count as if taken.
Parameters, constants, tuples, bitcasts and the loops themselves move nothing; an async op counts
at its start. Caches, reads that a fused kernel repeats, and overlap are not modelled: the count
is of traffic, and a bound on time only for ops that are bound by memory."""

import math
import re

from gated_attention import profiling

_ARRAY = re.compile(r'\b(pred|bf16|[fsu]\d+|f8e\w+|c64|c128)\[([\d,]*)\]')
_BITS = {'pred': 8, 'c64': 64, 'c128': 128}
# Ops that move no data of their own.
_BOOKKEEPING = {'parameter', 'constant', 'tuple', 'get-tuple-element', 'bitcast', 'while', 'call',
                'conditional', 'after-all', 'partition-id', 'replica-id', 'opt-barrier',
                'add-dependency', 'iota'}


def shape_bytes(shape: str) -> int:
  """Bytes of an HLO shape ('bf16[8,128]', or a tuple of them)."""
  total = 0
  for dtype, dims in _ARRAY.findall(shape):
    bits = _BITS.get(dtype) or int(re.search(r'\d+', dtype).group())
    total += math.prod(int(dim) for dim in dims.split(',') if dim) * bits // 8
  return total


def _executions(program: profiling.Program) -> tuple[dict[str, int], int]:
  """How many times each computation reached from the entry runs per step (fusions' own
  computations are their ops'), and how many loops have no known trip count."""
  runs, unknown, pending = {program.entry: 1}, 0, [program.entry]
  while pending:
    computation = pending.pop()
    for name in program.bodies.get(computation, ()):
      instruction = program.instructions[name]
      if instruction.opcode not in ('while', 'call', 'conditional'):
        continue
      times = runs[computation]
      if instruction.opcode == 'while':
        unknown += instruction.trip_count is None
        times *= instruction.trip_count or 1
      for callee in instruction.called:
        if callee in program.bodies and callee not in runs:
          runs[callee] = times
          pending.append(callee)
  return runs, unknown


def _users(program: profiling.Program, computation: str) -> dict[str, list]:
  users = {}
  for name in program.bodies[computation]:
    for operand in program.instructions[name].operands:
      users.setdefault(operand, []).append(name)
  return users


def _touched(program, users: dict, name: str) -> int | None:
  """Bytes a fused computation reads of its value `name` where it only slices it or only writes
  into it in place (through bitcasts), else None (read whole)."""
  total = 0
  for user in users.get(name, ()):
    instruction = program.instructions[user]
    if instruction.opcode == 'bitcast':
      through = _touched(program, users, user)
      if through is None:
        return None
      total += through
    elif instruction.opcode in ('dynamic-slice', 'slice') and instruction.operands[0] == name:
      total += shape_bytes(instruction.shape)
    elif not (instruction.opcode == 'dynamic-update-slice' and instruction.operands[0] == name):
      return None
  return total


def _written(program, name: str) -> int:
  """Bytes a (fused computation's) result writes: a dynamic-update-slice's update (in place),
  each element of a tuple so, else the whole result."""
  instruction = program.instructions[name]
  if instruction.opcode == 'bitcast':
    return _written(program, instruction.operands[0])
  if instruction.opcode == 'dynamic-update-slice':
    return shape_bytes(program.instructions[instruction.operands[1]].shape)
  if instruction.opcode == 'tuple':
    return sum(_written(program, operand) for operand in instruction.operands)
  return shape_bytes(instruction.shape)


def op_bytes(program: profiling.Program, name: str) -> int:
  """Bytes one execution of the op `name` reads and writes (the module docstring's rules)."""
  instruction = program.instructions[name]
  opcode = instruction.opcode
  if opcode in _BOOKKEEPING or re.search(r'-(done|update)$', opcode):
    return 0
  operand_bytes = [shape_bytes(program.instructions[operand].shape)
                   for operand in instruction.operands if operand in program.instructions]
  if opcode == 'dynamic-update-slice':
    return 2 * operand_bytes[1]
  if opcode in ('dynamic-slice', 'slice'):
    return 2 * shape_bytes(instruction.shape)
  if opcode != 'fusion':
    return sum(operand_bytes) + shape_bytes(instruction.shape)
  body = instruction.called[0]
  users = _users(program, body)
  parameters = {program.instructions[inner].parameter: inner for inner in program.bodies[body]
                if program.instructions[inner].opcode == 'parameter'}
  read = 0
  for number, size in enumerate(operand_bytes):
    touched = _touched(program, users, parameters[number]) if number in parameters else None
    read += size if touched is None else touched
  root = next(inner for inner in program.bodies[body] if program.instructions[inner].root)
  return read + _written(program, root)


def memory_traffic(hlo_text: str, top: int = 12) -> dict:
  """Per step of the program `hlo_text` (`compiled.as_text()`): bytes moved in all, by category
  (profiling.CATEGORIES), the `top` ops by bytes (per step: one execution's bytes times its
  executions), and how many loops were counted once for want of a known trip count."""
  program = profiling.parse_program(hlo_text)
  ops = profiling.program_ops(hlo_text)
  runs, unknown = _executions(program)
  rows = []
  for computation, times in runs.items():
    for name in program.bodies[computation]:
      if moved := op_bytes(program, name):
        rows.append(dict(name=name, bytes=moved * times, executions=times,
                         **ops[name]._asdict()))
  by_category = dict.fromkeys(profiling.CATEGORIES, 0)
  for row in rows:
    by_category[row['category']] += row['bytes']
  return {'bytes': sum(by_category.values()), 'categories_bytes': by_category,
          'loops_without_trip_count': unknown,
          'top_ops': sorted(rows, key=lambda row: -row['bytes'])[:top]}


def format_traffic(traffic: dict, bandwidth: float | None, device_kind: str) -> str:
  """A table of memory_traffic's result; with the device's bandwidth (bytes/s), the time that
  much traffic takes at least."""
  at = (lambda moved: f'{moved / bandwidth * 1e3:.1f}') if bandwidth else (lambda moved: '–')
  lines = [f'memory traffic per step per device, from the compiled program: '
           f'{traffic["bytes"] / 1e9:.1f} GB'
           + (f' (at the {bandwidth / 1e12:.3g} TB/s of a {device_kind}: '
              f'{at(traffic["bytes"])} ms)' if bandwidth else '')]
  lines += profiling.format_rows(('category', 'GB/step', 'ms at bandwidth'), [
      (category, f'{moved / 1e9:.2f}', at(moved))
      for category, moved in traffic['categories_bytes'].items()])
  lines += profiling.format_rows(('op', 'category', 'GB/step', 'runs', 'shape, source'), [
      (op['name'], op['category'], f'{op["bytes"] / 1e9:.2f}', op['executions'],
       f'{op["shape"][:40]} {op["source"][-60:]}') for op in traffic['top_ops']],
                                 note_column=True)
  if traffic['loops_without_trip_count']:
    lines.append(f'  ({traffic["loops_without_trip_count"]} loop(s) without a known trip count '
                 'counted once)')
  return '\n'.join(lines)
