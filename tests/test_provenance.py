"""Records of what made each output (seam_jax.provenance), the workdir lock, the user-data guard and the demo's
folder rule: unit tests on small files, no network and no JAX."""
import os
import signal
import subprocess
import sys
import time

import ml_collections
import pytest

from configs import demo, voc12
from seam_jax import provenance, runner, stages
from seam_jax.common import errors, files, workdir_lock
from seam_jax.data import prepare

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _config():
  return ml_collections.ConfigDict({'seed': 0, 'train': {'lr': 0.01, 'steps': (1, 2), 'log_every': 5,
                                                         'force': False},
                                    'data': {'crop': 4, 'canvas': 8}})


def test_read_fields_sections_single_fields_and_exclusions():
  c = _config()
  assert provenance.read_fields(c, ('train',)) == {'train.lr': 0.01, 'train.steps': [1, 2]}  # no execution-only
  assert provenance.read_fields(c, ('seed', 'data', '!data.canvas')) == {'data.crop': 4, 'seed': 0}
  assert provenance.read_fields(c, ('demo', 'train.lr')) == {'train.lr': 0.01}   # a section it lacks: left out
  with pytest.raises(errors.DataError, match="'train.lrr'"):
    provenance.read_fields(c, ('train.lrr',))


def test_every_declared_field_exists_in_the_recipes():
  for config in (demo.get_config(), demo.get_config('tiny'), voc12.get_config()):
    for st in stages.STAGES.values():
      fields = provenance.read_fields(config, st.fields)   # a typo would raise
      assert fields or st.name in ('demo', 'pretrain') and st.name not in config, st.name


def test_fingerprints_follow_content_and_files(tmp_path):
  small = tmp_path / 'list.txt'
  small.write_text('a\nb\n')
  fp = provenance.fingerprint(str(small))
  os.utime(small, (1, 1))
  assert provenance.fingerprint(str(small)) == fp                 # small files: by content
  small.write_text('a\nc\n')
  assert provenance.fingerprint(str(small)) != fp
  folder = tmp_path / 'cams'
  folder.mkdir()
  paths = []
  for k in range(provenance.GROUP + 2):
    paths.append(str(folder / f'{k}.npy'))
    open(paths[-1], 'w').close()
  ins = provenance.fingerprint_inputs(paths + [str(small)])
  assert set(ins) == {f'{folder}{os.sep} ({len(paths)} files)', str(small)}   # many files of a folder: one input
  os.utime(paths[3], (5, 5))
  assert provenance.fingerprint_inputs(paths + [str(small)]) != ins
  assert provenance.fingerprint_inputs(paths + [str(tmp_path / 'nope')]) is None


def test_check_states_and_reasons(tmp_path):
  wd, out, inp = str(tmp_path), str(tmp_path / 'out.txt'), str(tmp_path / 'in.txt')
  open(inp, 'w').write('x')
  fields = {'train.lr': 0.01}
  state, reasons, record = provenance.check(wd, 's', fields, [inp], [out])
  assert state == 'missing' and record['fields'] == fields
  provenance.write_record(wd, 's', record, 'running')
  assert provenance.check(wd, 's', fields, [inp], [out])[:2] == ('incomplete', ['interrupted: resuming'])
  open(out, 'w').write('y')
  provenance.write_record(wd, 's', record, 'complete', provenance.fingerprint_outputs([out]))
  assert provenance.check(wd, 's', fields, [inp], [out])[0] == 'complete'
  state, reasons, _ = provenance.check(wd, 's', {'train.lr': 0.02}, [inp], [out])
  assert state == 'stale' and reasons == ['train.lr 0.01 -> 0.02']
  open(inp, 'w').write('z')
  state, reasons, _ = provenance.check(wd, 's', fields, [inp], [out])
  assert state == 'stale' and reasons == [f'input {inp} changed']
  open(inp, 'w').write('x')
  os.utime(out, (7, 7))                                          # an output changed after the run
  assert provenance.check(wd, 's', fields, [inp], [out])[:2] == ('stale', ['outputs changed after they were made'])
  os.remove(out)
  assert provenance.check(wd, 's', fields, [inp], [out])[:2] == ('incomplete', ['1 outputs missing'])
  os.remove(provenance.record_path(wd, 's'))
  open(out, 'w').write('y')                                      # outputs nobody recorded
  assert provenance.check(wd, 's', fields, [inp], [out])[0] == 'stale'


def test_lock_refuses_a_second_run_and_takes_over_a_dead_ones(tmp_path):
  wd = str(tmp_path / 'work')
  with workdir_lock.hold(wd):
    holder = subprocess.run([sys.executable, '-c', f'from seam_jax.common import workdir_lock\n'
                             f'with workdir_lock.hold({wd!r}): pass'], cwd=ROOT, capture_output=True, text=True,
                            timeout=120)
    assert holder.returncode != 0
    assert f'pid {os.getpid()}' in holder.stderr and 'in use' in holder.stderr
  # A run killed while holding it: the next one takes over.
  proc = subprocess.Popen([sys.executable, '-c', f'import time\nfrom seam_jax.common import workdir_lock\n'
                           f'with workdir_lock.hold({wd!r}):\n  print("held", flush=True)\n  time.sleep(600)'],
                          cwd=ROOT, stdout=subprocess.PIPE, text=True)
  assert proc.stdout.readline().strip() == 'held'
  with pytest.raises(errors.DataError, match=f'pid {proc.pid}'):
    with workdir_lock.hold(wd):
      pass
  os.kill(proc.pid, signal.SIGKILL)
  proc.wait(60)
  with workdir_lock.hold(wd):
    pass


def test_demo_writes_only_into_its_own_or_an_empty_folder(tmp_path):
  c = demo.get_config('tiny')
  c.workdir, c.data.voc_root = str(tmp_path / 'work'), str(tmp_path / 'mine')
  os.makedirs(c.data.voc_root)
  (tmp_path / 'mine' / 'notes.txt').write_text('my data')
  with pytest.raises(errors.DataError, match='did not generate'):
    prepare.make_demo(c, workers=1)
  assert os.listdir(c.data.voc_root) == ['notes.txt']
  assert 'demo' not in stages.select('all', c)           # a user's folder: the demo stage is not in the pipeline
  c.data.voc_root = str(tmp_path / 'new')
  assert 'demo' in stages.select('all', c)
  prepare.make_demo(c, workers=1)
  assert prepare.is_demo_folder(c.data.voc_root)
  assert prepare.make_demo(c, force=True, workers=1)['num_images'] > 0   # its own folder: regenerated on request


def test_nothing_is_written_into_protected_folders(tmp_path):
  data = tmp_path / 'data'
  data.mkdir()
  (data / 'x.txt').write_text('keep')
  with files.protecting([str(data)]):
    with pytest.raises(errors.DataError, match='did not create'):
      files.atomic_write_text(str(data / 'sub' / 'y.txt'), 'no')
    with pytest.raises(errors.DataError):
      files.remove(str(data / 'x.txt'))
    files.atomic_write_text(str(tmp_path / 'ok.txt'), 'fine')
  assert sorted(os.listdir(data)) == ['x.txt'] and (data / 'x.txt').read_text() == 'keep'
  files.atomic_write_text(str(data / 'y.txt'), 'after the block: allowed')


def test_user_data_is_every_folder_the_run_did_not_create(tmp_path):
  c = demo.get_config('tiny')
  c.workdir = str(tmp_path / 'work')
  assert runner.user_data(c) == []                      # the demo's derived folder
  c.data.voc_root, c.data.sbd_root = str(tmp_path / 'voc'), str(tmp_path / 'sbd')
  os.makedirs(tmp_path / 'voc' / 'JPEGImages')
  assert runner.user_data(c) == [c.data.sbd_root, c.data.voc_root]
  open(tmp_path / 'voc' / prepare.DEMO_MARKER, 'w').close()
  assert runner.user_data(c) == [c.data.sbd_root]


def test_start_afresh_moves_training_aside_and_removes_per_image_outputs(tmp_path):
  c = demo.get_config('tiny')
  c.workdir = str(tmp_path)
  seam = tmp_path / 'seam' / 'ckpt'
  seam.mkdir(parents=True)
  for k in (1, 2):
    (seam / 'step').write_text(str(k))
    runner.start_afresh(stages.STAGES['train'], c)
    assert not (tmp_path / 'seam').exists()
    assert (tmp_path / 'superseded' / f'seam.{k}' / 'ckpt' / 'step').read_text() == str(k)
    seam.mkdir(parents=True)
  os.makedirs(tmp_path / 'lists')
  (tmp_path / 'lists' / 'trainval.txt').write_text('a\nb\n')
  files.save_npy_dict(str(tmp_path / 'cam' / 'a.npy'), {})
  (tmp_path / 'cam' / 'keep.txt').write_text('not an output')
  runner.start_afresh(stages.STAGES['infer'], c)
  assert os.listdir(tmp_path / 'cam') == ['keep.txt']
  time.sleep(0)
