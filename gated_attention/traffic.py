"""The bytes each op of a compiled step reads and writes, counted from the compiled program alone:
what bounds the time of everything that is not a matrix product (an op that moves B bytes takes
at least B / bandwidth), known before the step runs, for chips this host does not have
(`experiments.compile_only --traffic`).

An op moves its operands and its result as compiled, except what it does not touch:
- an operand that a fusion only slices or gathers from (dynamic-slice, slice, gather; through
  bitcasts) moves what is taken, and a gather alone reads what it takes;
- a dynamic-update-slice into a buffer the op was given (alone, or at a fusion's root) writes its
  update in place: the buffer moves nothing, the result the update;
- a loop's body and condition run its known trip count of times (scanned layers, microbatches,
  loss chunks), once where the compiler knows none;
- a conditional's branches each count as if taken;
- an async op (a collective, a copy) moves its operands and its result once, counted at its end.
Arrays a TPU keeps in its on-chip memory (memory space S(1) in their layouts) are not counted:
the count is of device memory (HBM). Parameters, constants, tuples, bitcasts and the loops
themselves move nothing. A scatter is
counted as reading and writing its whole buffer, and a custom call's result as written whole,
its scratch workspace included. Caches, reads that a
fused kernel repeats, and overlap are not modelled: the count is of traffic, and a bound on time
only for ops that are bound by memory."""

import math
import re

from gated_attention import profiling

# An array of a shape, with its layout where the text gives one.
_ARRAY = re.compile(r'\b(pred|bf16|[fsu]\d+|f8e\w+|c64|c128)\[([\d,]*)\](\{[^}]*\})?')
_BITS = {'pred': 8, 'c64': 64, 'c128': 128}
# Ops that move no data of their own.
_BOOKKEEPING = {'parameter', 'constant', 'tuple', 'get-tuple-element', 'bitcast', 'while', 'call',
                'conditional', 'after-all', 'partition-id', 'replica-id', 'opt-barrier',
                'add-dependency'}
# Ops that read only what they take of their first operand.
_TAKING = ('dynamic-slice', 'slice', 'gather')


def shape_bytes(shape: str) -> int:
  """Bytes in device memory of an HLO shape ('bf16[8,128]{1,0}', or a tuple of them): arrays
  that a TPU keeps in its on-chip memory (memory space S(1) in their layout) count nothing."""
  total = 0
  for dtype, dims, layout in _ARRAY.findall(shape):
    if re.search(r'S\([1-9]', layout):
      continue
    bits = _BITS.get(dtype) or int(re.search(r'\d+', dtype).group())
    total += math.prod(int(dim) for dim in dims.split(',') if dim) * bits // 8
  return total


def _bytes(instruction: profiling.Instruction) -> int:
  """shape_bytes of an instruction's result, read with its layout."""
  return shape_bytes(instruction.text.split(f' {instruction.opcode}(', 1)[0])


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
        trips = trip_count(program, instruction)
        unknown += trips is None
        times *= 1 if trips is None else trips
      for callee in instruction.called:
        if callee in program.bodies and callee not in runs:
          runs[callee] = times
          pending.append(callee)
  return runs, unknown


def _origin(program, name: str, through=('bitcast',)) -> str:
  """The instruction whose value `name` is, through ops that only pass it on (`through`)."""
  while program.instructions[name].opcode in through:
    name = program.instructions[name].operands[0]
  return name


def _source(program, name: str) -> profiling.Instruction:
  """The instruction whose value `name` is, through copies and bitcasts."""
  return program.instructions[_origin(program, name, ('copy', 'bitcast'))]


def _constant(program, name: str) -> int | None:
  """The value of a scalar integer constant (through copies), else None."""
  found = re.fullmatch(r'[su]\d+\[\](?:\{[^}]*\})? constant\((-?\d+)\).*',
                       _source(program, name).text)
  return int(found.group(1)) if found else None


def _element(program, name: str) -> int | None:
  """The tuple index that the get-tuple-element `name` is (through copies), else None."""
  instruction = _source(program, name)
  found = re.search(r'\bindex=(\d+)', instruction.text)
  return int(found.group(1)) if instruction.opcode == 'get-tuple-element' and found else None


def _root(program, computation: str) -> str:
  return next(name for name in program.bodies[computation] if program.instructions[name].root)


def trip_count(program: profiling.Program, loop: profiling.Instruction) -> int | None:
  """How many times a while loop runs: the compiler's count where it gives one, else read from
  the loop when it counts an element of its tuple from a constant, by a constant step, while
  below a constant (`i < n`, as XLA:TPU writes a scan without giving its count; copies looked
  through), else None."""
  if known := re.search(r'"known_trip_count":\{"n":"(\d+)"', loop.text):
    return int(known.group(1))
  condition, body = (re.search(rf'\b{key}=%?([\w.\-]+)', loop.text) for key in ('condition',
                                                                              'body'))
  if not (condition and body and condition.group(1) in program.bodies
          and body.group(1) in program.bodies):
    return None
  compare = program.instructions[_root(program, condition.group(1))]
  if compare.opcode != 'compare' or 'direction=LT' not in compare.text:
    return None
  index, bound = _element(program, compare.operands[0]), _constant(program, compare.operands[1])
  start_tuple = _source(program, loop.operands[0])
  next_tuple = _source(program, _root(program, body.group(1)))
  if (index is None or bound is None or start_tuple.opcode != 'tuple'
      or next_tuple.opcode != 'tuple'):
    return None
  start = _constant(program, start_tuple.operands[index])
  step = _source(program, next_tuple.operands[index])
  if start is None or step.opcode != 'add':
    return None
  counted = [operand for operand in step.operands if _element(program, operand) == index]
  steps = [_constant(program, operand) for operand in step.operands if operand not in counted]
  if len(counted) != 1 or len(steps) != 1 or not steps[0] or steps[0] < 0:
    return None
  return max(0, -(-(bound - start) // steps[0]))


def _in_place_updates(program, body: str) -> set:
  """The dynamic-update-slices of a fused computation that write into one of its parameters in
  place: at its root (or an element of a root tuple), through bitcasts."""
  root = _origin(program, _root(program, body))
  outputs = (program.instructions[root].operands if program.instructions[root].opcode == 'tuple'
             else [root])
  updates = set()
  for output in outputs:
    output = _origin(program, output)
    instruction = program.instructions[output]
    if (instruction.opcode == 'dynamic-update-slice' and program.instructions[
        _origin(program, instruction.operands[0])].opcode == 'parameter'):
      updates.add(output)
  return updates


def _touched(program, users: dict, in_place: set, name: str) -> int | None:
  """Bytes a fused computation reads of its value `name` where it only takes from it (slices,
  gathers) or only is the buffer of an in-place update (through bitcasts), else None (read
  whole)."""
  total = 0
  for user in users.get(name, ()):
    instruction = program.instructions[user]
    if instruction.opcode == 'bitcast':
      through = _touched(program, users, in_place, user)
      if through is None:
        return None
      total += through
    elif instruction.opcode in _TAKING and instruction.operands[0] == name:
      total += _bytes(instruction)
    elif not (user in in_place and instruction.operands[0] == name):
      return None
  return total


def _written(program, in_place: set, name: str) -> int:
  """Bytes a fused computation's result `name` writes: an in-place update's update, each
  element of a tuple so, else the whole result."""
  instruction = program.instructions[name]
  if instruction.opcode == 'bitcast':
    return _written(program, in_place, instruction.operands[0])
  if name in in_place:
    return _bytes(program.instructions[instruction.operands[1]])
  if instruction.opcode == 'tuple':
    return sum(_written(program, in_place, operand) for operand in instruction.operands)
  return _bytes(instruction)


def _fusion_bytes(program, instruction, operand_bytes: list) -> int:
  body = instruction.called[0]
  users = {}
  for name in program.bodies[body]:
    for operand in program.instructions[name].operands:
      users.setdefault(operand, []).append(name)
  in_place = _in_place_updates(program, body)
  parameters = {int(program.instructions[name].text.split('parameter(', 1)[1].split(')')[0]): name
                for name in program.bodies[body]
                if program.instructions[name].opcode == 'parameter'}
  read = 0
  for number, size in enumerate(operand_bytes):
    touched = (_touched(program, users, in_place, parameters[number]) if number in parameters
               else None)
    read += size if touched is None else min(size, touched)  # An operand on chip: nothing.
  return read + _written(program, in_place, _root(program, body))


def op_bytes(program: profiling.Program, name: str) -> int:
  """Bytes one execution of the op `name` reads and writes (the module docstring's rules)."""
  instruction = program.instructions[name]
  opcode = instruction.opcode
  if opcode in _BOOKKEEPING or re.search(r'-(start|update)$', opcode):
    return 0
  if opcode.endswith('-done'):  # What its start read, and what it gives.
    start = program.instructions[instruction.operands[0]]
    return (sum(_bytes(program.instructions[operand]) for operand in start.operands)
            + _bytes(instruction))
  operand_bytes = [_bytes(program.instructions[operand])
                   for operand in instruction.operands]
  if opcode == 'dynamic-update-slice':
    return 2 * operand_bytes[1]
  if opcode in _TAKING:  # What it takes, read and written, and its indices.
    return 2 * _bytes(instruction) + sum(operand_bytes[1:])
  if opcode == 'fusion':
    return _fusion_bytes(program, instruction, operand_bytes)
  return sum(operand_bytes) + _bytes(instruction)


def _check(program: profiling.Program) -> None:
  """Refuses text this counter cannot read whole, naming what is missing."""
  if program.entry is None:
    raise ValueError('no ENTRY computation: not the text of a compiled HLO module '
                     '(compiled.as_text())')
  for name, instruction in program.instructions.items():
    missing = [operand for operand in instruction.operands
               if operand not in program.instructions]
    if missing:
      raise ValueError(f'instruction {name} names operands the text does not define: {missing}')
    if instruction.opcode == 'fusion' and not (
        instruction.called and any(program.instructions[inner].root
                                   for inner in program.bodies.get(instruction.called[0], ()))):
      raise ValueError(f'fusion {name} calls no computation with a ROOT in the text')


def memory_traffic(hlo_text: str, top: int = 12) -> dict:
  """Per step of the program `hlo_text` (`compiled.as_text()`): bytes moved in all, by category
  (profiling.CATEGORIES), the `top` ops by bytes (per step: one execution's bytes times its
  executions), and how many loops were counted once for want of a known trip count."""
  program = profiling.parse_program(hlo_text)
  _check(program)
  ops = profiling.categorize(program)
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
