"""metrics.jsonl after a crash: a torn last line is ignored by readers and cut by writers, and a
resumed run cuts the records of steps it logs again; the log line's numbers."""

import json

from gated_attention.metrics import MetricsWriter, format_record, read_metrics


def _write_lines(path, steps, torn: str = ''):
  path.write_text(''.join(json.dumps({'step': s, 'loss': 1.0 / s}) + '\n' for s in steps) + torn)


def test_readers_ignore_a_torn_last_line(tmp_path):
  _write_lines(tmp_path / 'metrics.jsonl', [1, 2, 3], torn='{"step": 4, "lo')
  assert [r['step'] for r in read_metrics(tmp_path)] == [1, 2, 3]


def test_a_resumed_writer_keeps_each_step_once(tmp_path):
  _write_lines(tmp_path / 'metrics.jsonl', [1, 2, 3, 4, 5], torn='{"step": 6, "lo')
  writer = MetricsWriter(tmp_path, start_step=3)  # Resumed from the step-3 checkpoint.
  for step in (4, 5, 6):
    writer.write({'step': step, 'loss': 0.5})
  writer.close()
  assert [r['step'] for r in read_metrics(tmp_path)] == [1, 2, 3, 4, 5, 6]
  assert (tmp_path / 'metrics.jsonl').read_text().endswith('}\n')


def test_a_log_line_prints_rates_in_full_and_small_numbers_to_four_figures():
  line = format_record({'step': 3, 'loss': 2.345678, 'learning_rate': 0.0003,
                        'tokens_per_sec': 10061.7, 'mfu': None})
  assert line == 'step=3 loss=2.346 learning_rate=0.0003 tokens_per_sec=10,062'
