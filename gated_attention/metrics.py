"""Metric output on process 0: WORKDIR/metrics.jsonl (one JSON object per logged step, strict
JSON: a non-finite value is null) and TensorBoard event files in WORKDIR/tensorboard.

A run that resumes from step N first cuts both back to step N: records of steps after N were
logged by a run that crashed before saving them, and the resumed run logs those steps again.
A last line without its newline (a crash mid-write) is dropped by readers and cut by writers.
"""

import json
import math
import pathlib

import jax

from gated_attention.checkpoint import write_whole


def _records(path: pathlib.Path) -> list[dict]:
  """The complete records of a metrics file; a torn last line is left out."""
  text = path.read_text()
  lines = text.split('\n')[:-1]  # The part after the last newline is empty, or torn.
  return [json.loads(line) for line in lines if line.strip()]


class MetricsWriter:
  """Appends logged steps to metrics.jsonl and TensorBoard; a no-op on processes other than 0."""

  def __init__(self, workdir, start_step: int):
    """Cuts metrics.jsonl back to the records of steps <= start_step (atomically), and tells
    TensorBoard to hide earlier events of steps > start_step."""
    self.active = jax.process_index() == 0
    if not self.active:
      return
    from tensorboardX import SummaryWriter  # Imported here: only process 0 writes events.
    self.path = pathlib.Path(workdir) / 'metrics.jsonl'
    if self.path.exists():
      kept = [r for r in _records(self.path) if r['step'] <= start_step]
      write_whole(self.path, ''.join(json.dumps(r) + '\n' for r in kept))
    self.file = self.path.open('a')
    self.tensorboard = SummaryWriter(str(pathlib.Path(workdir) / 'tensorboard'),
                                     purge_step=start_step + 1)

  def write(self, record: dict) -> None:
    if not self.active:
      return
    self.file.write(json.dumps(strict_json(record)) + '\n')
    self.file.flush()
    for key, value in record.items():
      if key != 'step' and isinstance(value, (int, float)) and math.isfinite(value):
        self.tensorboard.add_scalar(key, value, record['step'])

  def close(self) -> None:
    if self.active:
      self.file.close()
      self.tensorboard.close()


def strict_json(record: dict) -> dict:
  """`record` with non-finite floats (a skipped step's loss) as None: JSON has no NaN, and
  strict readers refuse Python's `NaN` token."""
  return {key: None if isinstance(value, float) and not math.isfinite(value) else value
          for key, value in record.items()}


def read_metrics(workdir) -> list[dict]:
  """All complete records of WORKDIR/metrics.jsonl, in order."""
  return _records(pathlib.Path(workdir) / 'metrics.jsonl')


def format_record(record: dict) -> str:
  """One human-readable log line."""
  parts = []
  for key, value in record.items():
    if isinstance(value, float):  # Rates such as tokens_per_sec in full, not as 1.006e+04.
      parts.append(f'{key}={value:,.0f}' if abs(value) >= 1e4 else f'{key}={value:.4g}')
    elif value is not None:
      parts.append(f'{key}={value}')
  return ' '.join(parts)
