"""One writer per workdir: a held lock refuses naming its holder; a released or stale one does
not; an ablation sweep takes it too."""

import json
import os
import re
import socket

import pytest

from gated_attention import ablation
from gated_attention import workdir as workdir_lib
from gated_attention.checkpoint import CheckpointError
from tests import helpers


def test_a_held_workdir_is_refused_naming_its_holder(tmp_path):
  with workdir_lib.hold(tmp_path):
    holder = json.loads((tmp_path / 'lock').read_text())
    assert (holder['host'], holder['pid']) == (socket.gethostname(), os.getpid())
    with pytest.raises(CheckpointError, match=re.escape(
        f'{tmp_path} is in use by another run (pid {os.getpid()} on {socket.gethostname()}, '
        f'started {holder["time"]}: ')):
      with workdir_lib.hold(tmp_path):
        pass
  with workdir_lib.hold(tmp_path):  # Released on leaving the block.
    pass


def test_a_lock_left_by_a_dead_run_is_taken(tmp_path):
  (tmp_path / 'lock').write_text(json.dumps({'host': 'gone', 'pid': 1, 'time': 'earlier',
                                             'command': 'killed -9'}))
  with workdir_lib.hold(tmp_path):
    assert json.loads((tmp_path / 'lock').read_text())['pid'] == os.getpid()


def test_a_sweep_on_a_held_workdir_is_refused_before_training(tmp_path):
  config = helpers.run_config(steps=2)
  config.variants, config.learning_rates = 'none', ''
  with workdir_lib.hold(tmp_path):
    with pytest.raises(CheckpointError, match='is in use by another run'):
      ablation.run_ablation(config, tmp_path)
  assert not (tmp_path / 'runs').exists()


def test_a_workdir_that_cannot_be_written_is_named(tmp_path):
  (tmp_path / 'file').write_text('')
  with pytest.raises(CheckpointError, match=f'Cannot write to the workdir {tmp_path}/file/run '
                                            r'\(Not a directory\)'):
    with workdir_lib.hold(tmp_path / 'file' / 'run'):
      pass
