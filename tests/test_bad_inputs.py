"""Bad inputs through the real entry points (prepare.py, train.py, infer.py, evaluate.py as subprocesses on a tiny
demo set): each run exits with status != 0 and one line `error: ...` naming the file or config key, no traceback,
and leaves every file of its run folder as it was (nothing half-written, other outputs intact). A write the file
system refuses is one line too (seam_jax.common.cli.one_line_errors, also tested in-process)."""
import errno
import hashlib
import logging
import os
import re
import shutil
import subprocess
import sys
import types

import grain
import jax
import numpy as np
import pytest

from seam_jax.common import cli, files
from seam_jax.data import voc
from seam_jax.models import convert, weight_files
from seam_jax.train import checkpoints

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TIMEOUT_S = 600


class Evil:
  """Unpickling this runs `touch <marker>`."""

  def __init__(self, marker):
    self.marker = marker

  def __reduce__(self):
    return os.system, (f'touch {self.marker}',)


@pytest.fixture
def work(tiny_demo, tmp_path):
  """A copy of the prepared tiny demo run folder (VOC2012/, lists/) for one case to damage."""
  shutil.copytree(tiny_demo.workdir, tmp_path / 'run')
  return tmp_path / 'run'


# The run's own bookkeeping (seam_jax.runner): the lock, the resolved config, the records (a failed stage's says
# 'running': it is to be redone). Not outputs: a failed run may write them.
BOOKKEEPING = ('.lock', 'config.json', 'records' + os.sep)


def snapshot(root):
  out = {}
  for d, _, names in os.walk(root):
    for n in names:
      rel = os.path.relpath(os.path.join(d, n), root)
      if not rel.startswith(BOOKKEEPING):
        with open(os.path.join(d, n), 'rb') as f:
          out[rel] = hashlib.sha1(f.read()).hexdigest()
  return out


def run_bad(work, script, *flags, may_write=None):
  """Run `script` on `work` (its own data: the tiny demo flags without the data paths); check the one-line error
  and the untouched folder (but for new files under `may_write`); returns the error line."""
  before = snapshot(work)
  tiny = ['--config=configs/demo.py:tiny', '--config.pretrain.enabled=False', '--config.model.calibrate_bn=True']
  proc = subprocess.run([sys.executable, script, *tiny, f'--config.workdir={work}', *flags], cwd=ROOT,
                        env=dict(os.environ, PYTHONPATH=ROOT, JAX_PLATFORMS='cpu',
                                 XLA_FLAGS='--xla_force_host_platform_device_count=2'), capture_output=True, text=True,
                        timeout=TIMEOUT_S)
  errors = [l for l in proc.stderr.splitlines() if l.startswith('error:')]
  assert proc.returncode != 0 and len(errors) == 1, proc.stderr[-3000:]
  assert proc.stderr.count(errors[0][len('error: '):]) == 1, proc.stderr[-3000:]   # not also as a log line
  assert 'Traceback' not in proc.stderr, proc.stderr[-3000:]
  after = snapshot(work)
  if may_write:
    after = {k: v for k, v in after.items() if k in before or not k.startswith(may_write)}
  assert after == before
  return errors[0]


def image(work, k=0):
  return os.path.join(work, 'VOC2012/JPEGImages', voc.read_list(os.path.join(work, 'lists/train.txt'))[k] + '.jpg')


def aug_mask(work, k=0):
  return image(work, k).replace('JPEGImages', 'SegmentationClassAug').replace('.jpg', '.png')


# ------------------------------------------------------------------------------------------- prepare.py: files
def test_corrupt_jpeg(work):
  path = image(work)
  with open(path, 'r+b') as f:
    f.seek(0)
    f.write(b'\0' * 64)
  assert path in run_bad(work, 'prepare.py', '--workers=1')


def test_truncated_png(work):
  path = aug_mask(work, 1)
  with open(path, 'r+b') as f:
    f.truncate(os.path.getsize(path) // 2)
  assert path in run_bad(work, 'prepare.py', '--workers=1')


def test_mask_of_another_size(work):
  path = aug_mask(work, 2)
  files.save_label_png(path, np.zeros((8, 8), np.uint8))
  line = run_bad(work, 'prepare.py', '--workers=1')
  assert path in line and '8x8' in line and image(work, 2) in line


def test_list_naming_a_missing_image(work):
  split = os.path.join(work, 'VOC2012/ImageSets/Segmentation/train.txt')
  voc.write_list(split, voc.read_list(split) + ['2099_ghost'])
  assert os.path.join(work, 'VOC2012/JPEGImages/2099_ghost.jpg') in run_bad(work, 'prepare.py', '--workers=1')


# ----------------------------------------------------------------------------------------- train.py: data
def test_label_file_missing_an_id(work):
  labels = os.path.join(work, 'lists/cls_labels.npy')
  d = files.load_npy_dict(labels)
  del d[voc.read_list(os.path.join(work, 'lists/train_aug.txt'))[3]]
  files.save_npy_dict(labels, d)
  assert labels in run_bad(work, 'train.py')


@pytest.mark.slow
def test_train_list_naming_a_missing_image(work):
  ids = voc.read_list(os.path.join(work, 'lists/train.txt'))[:3] + ['2099_ghost']
  voc.write_list(os.path.join(work, 'lists/four.txt'), ids)
  labels = os.path.join(work, 'lists/cls_labels.npy')
  files.save_npy_dict(labels, dict(files.load_npy_dict(labels), **{'2099_ghost': np.eye(20, dtype=np.float32)[0]}))
  line = run_bad(work, 'train.py', f'--config.data.train_list={work}/lists/four.txt')
  assert os.path.join(work, 'VOC2012/JPEGImages/2099_ghost.jpg') in line


def test_empty_list(work):
  path = os.path.join(work, 'lists/train_aug.txt')
  open(path, 'w').close()
  assert path in run_bad(work, 'train.py')


def test_duplicate_ids(work):
  path = os.path.join(work, 'lists/train_aug.txt')
  ids = voc.read_list(path)
  voc.write_list(path, ids + ids[:2])
  line = run_bad(work, 'train.py')
  assert path in line and ids[0] in line


def test_label_pickle_that_runs_code(work):
  labels, marker = os.path.join(work, 'lists/cls_labels.npy'), os.path.join(work, '..', 'pwned')
  np.save(labels, {'x': Evil(marker)}, allow_pickle=True)
  assert labels in run_bad(work, 'train.py')
  assert not os.path.exists(marker)


@pytest.mark.slow
def test_non_finite_loss(work):
  """A learning rate that blows the weights up: the step with a non-finite loss is named, the checkpoints saved
  before it hold finite states only (the trainer checks before each save), nothing is exported."""
  line = run_bad(work, 'train.py', '--config.train.lr=1e30', '--config.train.max_steps=4',
                 '--config.train.log_every=1', '--config.train.ckpt_every=1', may_write='seam' + os.sep)
  assert 'non-finite' in line and 'step' in line and os.path.join(work, 'seam/ckpt') in line
  assert not os.path.exists(os.path.join(work, 'seam/export'))


# --------------------------------------------------------------------------------------------- config flags
def test_unknown_config_key(work):
  assert 'train.bogus' in run_bad(work, 'train.py', '--config.train.bogus=1')


def test_value_of_the_wrong_type(work):
  assert 'train.batch_size' in run_bad(work, 'train.py', '--config.train.batch_size=four')


# ------------------------------------------------------------------------------------------------ weights
def zero_variables(kind, width_div):
  model_config = convert.model_config(width_div)
  return jax.tree.map(lambda s: np.zeros(s.shape, s.dtype), convert.abstract_variables(kind, model_config))


def test_checkpoint_of_another_width(work):
  """A training checkpoint of width_div 16 where this run trains width_div 32."""
  mngr = checkpoints.manager(os.path.join(work, 'seam/ckpt'), 2)
  state = {'state': {'step': np.zeros((), np.int32)}, 'rng': np.zeros(2, np.uint32)}
  checkpoints.save(mngr, 1, state, state['rng'], iter(grain.MapDataset.range(4).to_iter_dataset()),
                   {'task': 'seam', 'kind': 'seam', 'width_div': 16})
  mngr.close()
  line = run_bad(work, 'train.py')
  assert os.path.join(work, 'seam/ckpt') in line and "'width_div': 16" in line


def test_export_of_another_model(work):
  path = os.path.join(work, 'affinity_export')
  from seam_jax.models import export  # pylint: disable=g-import-not-at-top
  export.save_export(path, zero_variables('affinity', 32), 'affinity', convert.model_config(32))
  line = run_bad(work, 'infer.py', '--steps=cam', f'--config.infer.checkpoint={path}')
  assert path in line and 'affinity' in line


def test_damaged_export(work):
  """An export folder whose weight files were truncated (orbax / tensorstore errors): one line naming it."""
  path = os.path.join(work, 'seam_export')
  from seam_jax.models import export  # pylint: disable=g-import-not-at-top
  export.save_export(path, zero_variables('seam', 32), 'seam', convert.model_config(32))
  data = os.path.join(path, 'variables', 'd')
  for name in os.listdir(data):
    os.truncate(os.path.join(data, name), 10)
  line = run_bad(work, 'infer.py', '--steps=cam', f'--config.infer.checkpoint={path}')
  assert os.path.join(path, 'variables') in line and 'damaged export' in line

@pytest.mark.slow
def test_pth_with_unexpected_keys(work):
  path = os.path.join(work, 'seam.pth')
  sd = convert.variables_to_state_dict(zero_variables('seam', 32), 'seam')
  sd['module.extra.weight'] = np.zeros(3, np.float32)
  weight_files.write_pth(path, sd)
  line = run_bad(work, 'infer.py', '--steps=cam', f'--config.infer.checkpoint={path}')
  assert path in line and 'extra.weight' in line


def test_pth_pickle_that_runs_code(work):
  import torch  # pylint: disable=g-import-not-at-top  (a test dependency: requirements-dev.txt)
  path, marker = os.path.join(work, 'evil.pth'), os.path.join(work, '..', 'pwned')
  torch.save({'conv1a.weight': Evil(marker)}, path)
  assert path in run_bad(work, 'infer.py', '--steps=cam', f'--config.infer.checkpoint={path}')
  assert not os.path.exists(marker)


def test_cam_pickle_that_runs_code(work):
  marker = os.path.join(work, '..', 'pwned')
  ids = voc.read_list(os.path.join(work, 'lists/train.txt'))
  for k, i in enumerate(ids):
    files.save_npy_dict(os.path.join(work, 'cam', i + '.npy'), {0: np.zeros(files.image_size(image(work, k)))})
  path = os.path.join(work, 'cam', ids[0] + '.npy')
  np.save(path, {0: Evil(marker)}, allow_pickle=True)
  assert path in run_bad(work, 'evaluate.py', '--config.eval.workers=1', '--config.eval.list=train')
  assert not os.path.exists(marker)



# ------------------------------------------------------------------------------------------ refused writes
def test_workdir_below_a_regular_file(work):
  """A file where the run folder's parent should be (the reproducible stand-in, also as root, for a read-only or
  full disk): one line naming the path, exit status 1."""
  blocker = os.path.join(os.path.dirname(work), 'blocker')
  open(blocker, 'w').close()
  line = run_bad(work, 'prepare.py', '--demo', '--workers=1', f'--config.workdir={blocker}/run')
  assert line.startswith(f'error: cannot write {blocker}/run') and 'Not a directory' in line, line


TS_ENOSPC = ('RESOURCE_EXHAUSTED: Error writing "state.w/0.0" in OCDBT database at local file "/w/ckpt/": Failed '
             'writing: "/w/ckpt/d/ab12": Failed to write 9 bytes to file 9: No space left on device '
             "[os_error_code='28'] [tensorstore_spec='{\"driver\":\"zarr\"}']")


@pytest.mark.parametrize('error, line', [
    (PermissionError(errno.EACCES, 'Permission denied', '/w/1.npy'), 'cannot write /w/1.npy: Permission denied'),
    (OSError(errno.EROFS, 'Read-only file system', '/w/seam'), 'cannot write /w/seam: Read-only file system'),
    (OSError(errno.ENOSPC, 'No space left on device'), 'cannot write a file: No space left on device'),
    (OSError(errno.EDQUOT, 'Disk quota exceeded', '/w/x'), 'cannot write /w/x: Disk quota exceeded'),
    (ValueError(TS_ENOSPC), 'cannot write /w/ckpt/d/ab12: No space left on device'),   # orbax's tensorstore
])
def test_refused_write_is_one_line(error, line):
  with pytest.raises(SystemExit, match=f'^error: {re.escape(line)}$'):
    with cli.one_line_errors():
      try:
        raise error
      except (OSError, ValueError) as e:
        raise RuntimeError('wrapped by a library') from e


def test_refused_background_write_then_timeout_is_one_line():
  """orbax creates a checkpoint folder in a thread, logs the OSError there and fails the main thread later with a
  timeout: the logged error (its traceback dropped) is the line reported."""
  try:
    raise OSError(errno.EROFS, 'Read-only file system', '/w/seam/ckpt/2.orbax-checkpoint-tmp')
  except OSError:
    record = logging.LogRecord('absl', logging.ERROR, '/site-packages/orbax/checkpoint/future.py', 1, 'raised', None,
                               sys.exc_info())
  with pytest.raises(SystemExit, match=r'^error: cannot write /w/seam/ckpt/2\.orbax-checkpoint-tmp: Read-only'):
    with cli.one_line_errors():
      assert not cli.quiet_libraries().filter(record)
      raise TimeoutError("Timeout waiting for key 'step_directory_creation'")


@pytest.mark.parametrize('error', [FileNotFoundError(errno.ENOENT, 'No such file', '/w/x'), ZeroDivisionError()])
def test_other_errors_keep_their_traceback(error):
  """A missing file is a reader's job (DataError) and anything else a bug: neither is turned into a line."""
  with pytest.raises(type(error)):
    with cli.one_line_errors():
      raise error


def test_leftover_callbacks_of_a_failed_read_are_dropped(monkeypatch):
  """orbax's tensorstore callbacks that outlive a failed restore report 'Event loop is closed' as unraisable
  errors (tracebacks on stderr): dropped; other unraisable errors still reach the previous hook."""
  seen = []
  monkeypatch.setattr(sys, 'unraisablehook', lambda u: seen.append(str(u.exc_value)))
  with cli.one_line_errors():
    for error in (RuntimeError('Event loop is closed'), ValueError('a bug')):
      sys.unraisablehook(types.SimpleNamespace(exc_value=error))
  assert seen == ['a bug']
