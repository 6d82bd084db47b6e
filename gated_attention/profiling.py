"""Where a compiled step's time goes: a jax.profiler trace of a few steps, each traced op's time
joined by its name to the instruction of the compiled program it ran, and summed by category
(matmul, attention, collective, data movement, other fusions, other).

The join is by instruction name, the one thing every backend's trace shares: an XLA:CPU thunk
and a GPU kernel carry their instruction (and its program) in `hlo_op` (`hlo_module`); a TPU's
`XLA Ops` line names its ops directly. Events that name no instruction of the program (the
runtime's own, copies, Python, other programs) are left out, and so are loops, conditionals and
calls, whose bodies are traced op by op."""

import collections
import gzip
import json
import pathlib
import re
import time
from typing import NamedTuple

import jax

CATEGORIES = ('matmul', 'attention', 'collective', 'data movement', 'other fusion', 'other')


class ProfileError(RuntimeError):
  """A trace that cannot be summarized: none written, or none of its events names an op of the
  compiled program (a trace format this reader does not know)."""


_MATMUL_OPCODES = {'dot', 'convolution', 'ragged-dot'}
_COLLECTIVE_OPCODES = {'all-reduce', 'all-gather', 'reduce-scatter', 'all-to-all',
                       'ragged-all-to-all', 'collective-permute', 'collective-broadcast', 'send',
                       'recv'}
# Ops that only move or reshape data: a fusion of nothing else is data movement.
_DATA_MOVEMENT_OPCODES = {'copy', 'transpose', 'bitcast', 'reshape', 'broadcast', 'slice',
                          'concatenate', 'pad', 'dynamic-slice', 'dynamic-update-slice',
                          'reverse', 'parameter', 'constant', 'tuple', 'get-tuple-element',
                          'bitcast-convert'}  # copy-start and copy-done count as copy.
# Ops whose time is their body's, which the trace holds op by op.
_CONTROL_OPCODES = {'while', 'conditional', 'call'}
# Ops that are what they wrap (their called computations), as a fusion is what it fuses.
_WRAPPER_OPCODES = {'fusion', 'async'}
# Custom calls by target and instruction name (a Pallas kernel's instruction is named after it:
# splash_mha_fwd, gmm): cuDNN's fMHA, cpu_flash, splash; cuBLAS, megablox.
_ATTENTION_KERNEL = re.compile(r'fmha|flash|splash|attention', re.IGNORECASE)
_MATMUL_KERNEL = re.compile(r'gemm|matmul|gmm', re.IGNORECASE)

_COMPUTATION = re.compile(r'^(?:ENTRY\s+)?%?([^\s(]+)\s.*->.*\{\s*$')
_INSTRUCTION = re.compile(r'^\s+(?:ROOT\s+)?%?([^\s=]+) = (.*)$')
_OPCODE = re.compile(r'(?:^|\s)([a-z][\w\-]*)\(')
_CALLED = re.compile(r'\b(?:calls|to_apply|body|condition|true_computation|false_computation|'
                     r'select|scatter)=(%?[\w.\-]+)|'
                     r'\b(?:branch_computations|called_computations)=\{([^}]*)\}')
_TARGET = re.compile(r'custom_call_target="([^"]*)"')
_SOURCE = re.compile(r'op_name="([^"]*)"')
_OPERAND = re.compile(r'%([\w.\-]+)')


class Op(NamedTuple):
  """One instruction of a compiled program: its category (one of CATEGORIES, or 'control' for
  loops and calls), result shape, and the JAX operation it came from (metadata; may be '')."""
  category: str
  shape: str
  source: str


def _base_opcode(opcode: str) -> str:
  """all-reduce-start / all-reduce-done -> all-reduce, async-start -> async (async ops)."""
  return re.sub(r'-(start|done|update)$', '', opcode)


class Instruction(NamedTuple):
  """One instruction of a compiled program's text: its opcode, custom call's target and name
  (or ''), called computations, result shape without layouts, source (the JAX operation, from
  metadata), operands' names, whether it is its computation's root, and its whole text."""
  opcode: str
  target: str
  called: list
  shape: str
  source: str
  operands: list
  root: bool
  text: str  # All of it after `name = `: attributes the fields above leave out.


class Program(NamedTuple):
  """A compiled program's text parsed: instructions by name, each computation's instructions'
  names in order, and the entry computation's name."""
  instructions: dict
  bodies: dict
  entry: str | None


def _operands(arguments: str) -> list:
  """The names of an instruction's operands: those in `arguments` (its text after the opcode's
  parenthesis) up to the matching one."""
  depth, end = 1, 0
  while end < len(arguments) and depth:
    depth += {'(': 1, ')': -1}.get(arguments[end], 0)
    end += 1
  return _OPERAND.findall(arguments[:end])


def parse_program(hlo_text: str) -> Program:
  """Parses `compiled.as_text()` (HLO text) into its instructions and computations."""
  instructions, bodies = {}, collections.defaultdict(list)
  computation = entry = None
  for line in hlo_text.splitlines():
    if not line.startswith(' ') and (header := _COMPUTATION.match(line)):
      computation = header.group(1)
      entry = computation if line.startswith('ENTRY') else entry
      continue
    if computation is None or not (found := _INSTRUCTION.match(line)):
      continue
    name, rest = found.groups()
    opcode, target, source = (_OPCODE.search(rest), _TARGET.search(rest), _SOURCE.search(rest))
    called = [callee.strip().lstrip('%') for one, several in _CALLED.findall(rest)
              for callee in (one or several).split(',') if callee.strip()]
    code, arguments = (opcode.group(1), rest[opcode.end():]) if opcode else ('', '')
    instructions[name] = Instruction(
        opcode=code, target=f'{target.group(1)} {name}' if target else '', called=called,
        shape=re.sub(r'\{[^}]*\}', '', rest[:opcode.start()].strip() if opcode else ''),
        source=source.group(1).split('/', 1)[-1] if source else '',
        operands=_operands(arguments), root=line.lstrip().startswith('ROOT '), text=rest)
    bodies[computation].append(name)
  return Program(instructions, dict(bodies), entry)


def program_ops(hlo_text: str) -> dict[str, Op]:
  """Instruction name -> Op for every instruction of a compiled program's text
  (`compiled.as_text()`): `categorize` of its `parse_program`."""
  return categorize(parse_program(hlo_text))


def categorize(program: Program) -> dict[str, Op]:
  """Instruction name -> Op for every instruction of a parsed program. An op is categorized by
  what it holds (a fusion or an async op by what it wraps): attention where a custom call names
  an attention kernel, else matmul where it holds a dot or a GEMM kernel, else collective, else
  data movement where it only moves data, else other fusion (a fusion) or other; loops,
  conditionals and calls are 'control'."""
  instructions, bodies, _ = program
  inside_memo = {}

  def inside(computation_name: str) -> set:
    """Opcodes (custom calls as `custom-call:TARGET NAME`) in a computation, nested ones too."""
    if computation_name not in inside_memo:
      inside_memo[computation_name] = set()  # Guards against a cycle (none in valid HLO).
      found = set()
      for name in bodies.get(computation_name, ()):
        opcode, target, called = instructions[name][:3]
        found.add(f'custom-call:{target}' if opcode == 'custom-call' else _base_opcode(opcode))
        for callee in called:
          found |= inside(callee)
      inside_memo[computation_name] = found
    return inside_memo[computation_name]

  def category(opcode: str, target: str, called: list) -> str:
    opcode = _base_opcode(opcode)
    if opcode in _CONTROL_OPCODES:
      return 'control'
    # A fusion is what it fuses; any other op is itself and what it calls (a reduce's adder).
    contents = (set() if opcode in _WRAPPER_OPCODES else
                {f'custom-call:{target}' if opcode == 'custom-call' else opcode})
    for callee in called:
      contents |= inside(callee)
    targets = [op.split(':', 1)[1] for op in contents if op.startswith('custom-call:')]
    if any(_ATTENTION_KERNEL.search(t) for t in targets):
      return 'attention'
    if contents & _MATMUL_OPCODES or any(_MATMUL_KERNEL.search(t) for t in targets):
      return 'matmul'
    if contents & _COLLECTIVE_OPCODES:
      return 'collective'
    if contents and contents <= _DATA_MOVEMENT_OPCODES:
      return 'data movement'
    return 'other fusion' if opcode == 'fusion' else 'other'

  return {name: Op(category(*fields[:3]), fields.shape, fields.source)
          for name, fields in instructions.items()}


def op_times(trace_events: list, names, module: str | None = None) -> dict[str, float]:
  """Seconds per instruction name summed over a trace's complete events (Chrome trace format,
  timestamps in microseconds), for the names in `names`, of the program `module` where events
  name their module (other programs' ops of the same names are left out).

  Each op's time is the mean over the devices it ran on (one program runs on each). Where the
  trace has devices, their events: a device's `XLA Ops` lines where it has them (libtpu writes
  one; XProf derives one per GPU stream), named after their instructions, else its kernels by
  the instruction in their `hlo_op` (what jax writes for a GPU; copies and the tracer's own
  events carry none). Else the host's: XLA:CPU's thunks, by their `hlo_op` too."""
  processes, threads = {}, {}
  for event in trace_events:
    if event.get('ph') == 'M' and event.get('name') == 'process_name':
      processes[event['pid']] = event['args']['name']
    elif event.get('ph') == 'M' and event.get('name') == 'thread_name':
      threads[(event['pid'], event.get('tid'))] = event['args']['name']
  complete = [event for event in trace_events if event.get('ph') == 'X' and 'dur' in event]
  # Chips, not the host, Megascale's network or a TPU's SparseCores (which have no op line).
  with_events = {event['pid'] for event in complete}
  devices = {pid for pid, name in processes.items()
             if pid in with_events and re.match(r'/device:(GPU|TPU):\d+$', name)}
  op_lines = {key for key, name in threads.items()
              if key[0] in devices and name.startswith('XLA Ops')}

  def op_name(event):
    args = event.get('args') or {}
    if (devices and event['pid'] not in devices
        or module and args.get('hlo_module', module) != module):
      return None
    if op_lines:
      return event['name'] if (event['pid'], event.get('tid')) in op_lines else None
    return args['hlo_op'].split('::')[-1] if args.get('hlo_op') else None

  times, ran_on = collections.defaultdict(float), set()
  for event in complete:
    if (name := op_name(event)) in names:
      times[name] += event['dur'] * 1e-6
      # A chip by its process; XLA:CPU's devices share the host's, and name their ordinal.
      ran_on.add(event['pid'] if devices else (event.get('args') or {}).get('device_ordinal'))
  return {name: seconds / len(ran_on) for name, seconds in times.items()}


def summarize(times: dict[str, float], ops: dict[str, Op], steps: int, step_time_s: float,
              top: int = 12) -> dict:
  """Per step: seconds by category (loops and calls left out), their total, the step's wall
  time, and the `top` ops by time with their category, shape and source."""
  timed = {name: seconds / steps for name, seconds in times.items()
           if ops[name].category != 'control'}
  by_category = dict.fromkeys(CATEGORIES, 0.0)
  for name, seconds in timed.items():
    by_category[ops[name].category] += seconds
  ranked = sorted(timed.items(), key=lambda item: -item[1])[:top]
  return {'steps': steps, 'step_time_s': step_time_s, 'op_time_s': sum(timed.values()),
          'categories_s': by_category,
          'top_ops': [dict(name=name, time_s=seconds, **ops[name]._asdict())
                      for name, seconds in ranked]}


def read_trace(directory: pathlib.Path, since: float = 0.0) -> list:
  """The events of the newest perfetto trace jax.profiler wrote under `directory`, written at
  `since` (a time.time()) or later: an earlier run's trace there is never taken for this one's."""
  # Two seconds of slack for file systems that round their modification times down.
  paths = sorted((path for path in pathlib.Path(directory).rglob('perfetto_trace.json.gz')
                  if path.stat().st_mtime >= since - 2), key=lambda path: path.stat().st_mtime)
  if not paths:
    raise ProfileError(f'no perfetto_trace.json.gz under {directory} written by this trace: the '
                       'profiler wrote none')
  with gzip.open(paths[-1], 'rt') as file:
    trace = json.load(file)
  return trace['traceEvents'] if isinstance(trace, dict) else trace


def start_trace(directory: pathlib.Path) -> float:
  """Starts jax.profiler's trace into `directory`, a perfetto trace (which `read_trace` reads)
  beside the XProf one, without Python's calls (tracing them slowed traced steps 2x). Returns
  the time.time() it started, for `summarize_trace`."""
  started = time.time()
  options = jax.profiler.ProfileOptions()
  options.python_tracer_level = 0
  jax.profiler.start_trace(str(directory), create_perfetto_trace=True, profiler_options=options)
  return started


def summarize_trace(directory: pathlib.Path, hlo_text: str, steps: int, step_time_s: float,
                    since: float) -> dict:
  """`summarize` of the trace started at `since` (`start_trace`) in `directory`, of `steps`
  steps of the program `hlo_text`, with the trace's folder as `trace_dir`. Raises ProfileError
  where no traced event names an op of the program outside loops and calls: a summary of
  nothing would read as a step that costs nothing."""
  ops, events = program_ops(hlo_text), read_trace(directory, since)
  module = re.match(r'HloModule ([^\s,]+)', hlo_text)
  summary = summarize(op_times(events, ops, module.group(1) if module else None), ops, steps,
                      step_time_s)
  if not summary['op_time_s']:
    raise ProfileError(f'none of the {len(events):,} events of the trace in {directory} names an '
                       f'op of the compiled step ({len(ops):,} instructions) outside its loops: '
                       'a trace format this reader does not know; the trace itself is there to '
                       'view')
  return dict(summary, trace_dir=str(directory))


def format_rows(header: tuple, rows: list[tuple], note_column: bool = False) -> list[str]:
  """Lines of a table, indented: columns of numbers right-aligned, others left-aligned, each as
  wide as its widest cell; with `note_column`, the last is free text (shape, source)."""
  cells = [tuple(str(cell) for cell in row) for row in (header, *rows)]
  aligned = len(header) - note_column
  widths = [max(len(row[column]) for row in cells) for column in range(aligned)]
  numeric = [all(re.fullmatch(r'[-+\d.,%–]+', row[column]) for row in cells[1:])
             for column in range(aligned)]
  return ['  ' + ' '.join([row[c].rjust(widths[c]) if numeric[c] else row[c].ljust(widths[c])
                           for c in range(aligned)] + list(row[aligned:])).rstrip()
          for row in cells]


def format_summary(summary: dict) -> str:
  """A table of the summary: categories, then the costliest ops."""
  op_time = summary['op_time_s'] or float('nan')
  lines = [f'where the time goes: {summary["steps"]} steps traced at '
           f'{summary["step_time_s"] * 1e3:.1f} ms/step (under the profiler); the ops took '
           f'{summary["op_time_s"] * 1e3:.1f} ms/step (ops that overlap count in full, gaps '
           f'between them not at all)']
  lines += format_rows(('category', 'ms/step', 'share'), [
      (category, f'{seconds * 1e3:.2f}', f'{seconds / op_time:.1%}')
      for category, seconds in summary['categories_s'].items()])
  lines += format_rows(('op', 'category', 'ms/step', 'shape, source'), [
      (op['name'], op['category'], f'{op["time_s"] * 1e3:.2f}',
       f'{op["shape"][:40]} {op["source"][-60:]}') for op in summary['top_ops']],
                       note_column=True)
  lines.append(f'  trace: {summary["trace_dir"]}')
  return '\n'.join(lines)
