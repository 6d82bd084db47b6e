"""Metric output on process 0: WORKDIR/metrics.jsonl (one JSON object per logged step) and
TensorBoard event files in WORKDIR/tensorboard."""

import json
import math
import pathlib

import jax


class MetricsWriter:
  """Appends logged steps to metrics.jsonl and TensorBoard; a no-op on processes other than 0."""

  def __init__(self, workdir):
    self.active = jax.process_index() == 0
    if not self.active:
      return
    from tensorboardX import SummaryWriter  # Imported here: only process 0 writes events.
    self.path = pathlib.Path(workdir) / 'metrics.jsonl'
    self.file = self.path.open('a')
    self.tensorboard = SummaryWriter(str(pathlib.Path(workdir) / 'tensorboard'))

  def write(self, record: dict) -> None:
    if not self.active:
      return
    self.file.write(json.dumps(record) + '\n')
    self.file.flush()
    for key, value in record.items():
      if key != 'step' and isinstance(value, (int, float)) and math.isfinite(value):
        self.tensorboard.add_scalar(key, value, record['step'])

  def close(self) -> None:
    if self.active:
      self.file.close()
      self.tensorboard.close()


def read_metrics(workdir) -> list[dict]:
  """All records of WORKDIR/metrics.jsonl, in order."""
  path = pathlib.Path(workdir) / 'metrics.jsonl'
  return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def format_record(record: dict) -> str:
  """One human-readable log line."""
  parts = []
  for key, value in record.items():
    if isinstance(value, float):
      parts.append(f'{key}={value:.4g}')
    elif value is not None:
      parts.append(f'{key}={value}')
  return ' '.join(parts)
