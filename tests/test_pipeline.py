"""The stage registry and the pipeline as a product: stage selection, the complete / stale check, the plain-CAM
baseline (loss, inference branch, variant run folder), and one end-to-end run of every stage on the tiny demo config
(configs/demo.py:tiny) with the baseline: outputs well formed, nothing written outside the workdir, a rerun skips
every stage, the report complete and equal to summary.json."""
import html.parser
import json
import os
import subprocess
import sys
import types

import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image
import pytest
import torch
import torch.nn.functional as F

from configs import demo, voc12
from seam_jax import layout, models, provenance, runner, stages
from seam_jax.common import errors, files
from seam_jax.train import equivariance, losses, seam_task, trainer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
F32_EPS = float(np.finfo(np.float32).eps)


# ------------------------------------------------------------------------------------------------ selection
def test_select_names_lists_and_ranges():
  order = list(stages.STAGES)
  core = ['demo', 'prepare', 'train', 'infer', 'crf', 'eval_cam', 'eval_crf', 'train_aff', 'rw', 'eval_rw']
  assert [n for n in order if n in core] == core                       # the pipeline order (others may sit between)
  d, v = demo.get_config(), voc12.get_config()
  between = lambda a, b: order[order.index(a):order.index(b) + 1]
  assert stages.select('infer..rw', d) == between('infer', 'rw')
  assert {'infer', 'crf', 'eval_cam', 'eval_crf', 'train_aff', 'rw'} <= set(between('infer', 'rw'))
  assert stages.select('eval_cam,train', d) == ['eval_cam', 'train']          # as written
  assert stages.select('infer, infer..crf ,crf', d) == between('infer', 'crf')  # repeats once
  assert stages.select('..prepare', d) == ['demo', 'prepare']
  assert stages.select('..prepare', v) == ['prepare']                          # demo applies to demo configs only
  assert stages.select('demo', v) == ['demo']                                  # unless named
  assert stages.select('rw..', d) == [n for n in order[order.index('rw'):] if n != 'eval_custom']  # applies: no
  assert stages.select('eval_custom', d) == ['eval_custom']                    # eval.pred_dir: named only
  assert stages.select('all', d) == [n for n in order if stages.STAGES[n].applies(d)]
  assert stages.select('', v) == [n for n in order if stages.STAGES[n].applies(v)]
  assert 'demo' not in stages.select('', v)
  assert stages.baseline_stages(stages.select('all', d)) == between('train', 'eval_rw')


@pytest.mark.parametrize('spec,needle', [('bogus', "unknown stage 'bogus'"), ('infer..nope', "unknown stage 'nope'"),
                                         ('rw..infer', 'runs backwards')])
def test_select_rejects_bad_specs(spec, needle):
  with pytest.raises(errors.DataError, match=needle) as e:
    stages.select(spec, demo.get_config())
  assert 'prepare' in str(e.value)   # the message lists the stages


def test_unknown_stage_is_one_clear_line(tmp_path):
  r = subprocess.run([sys.executable, '-m', 'seam_jax', 'infer..bogus', f'--config={ROOT}/configs/demo.py:tiny',
                      f'--config.workdir={tmp_path}/work'], cwd=tmp_path, capture_output=True, text=True, timeout=900)
  assert r.returncode != 0
  assert [l for l in r.stderr.splitlines() if l.startswith('error:')] == [
      f"error: unknown stage 'bogus' in 'infer..bogus'; the stages are: {', '.join(stages.STAGES)}"]
  assert 'Traceback' not in r.stderr and not os.path.exists(tmp_path / 'work')


# ------------------------------------------------------------------------------------------------ complete / stale
def test_stage_state_from_its_record(tmp_path):
  """A per-image stage (crf) through runner.check: outputs listed from its list, inputs fingerprinted, states from
  the record (seam_jax.provenance; its own tests cover every state)."""
  c = demo.get_config()
  c.workdir = str(tmp_path)
  os.makedirs(layout.list_dir(c))
  with open(layout.list_path(c, c.infer.list), 'w') as f:
    f.write('a\nb\n')
  cams = [layout.cam_path(c, i) for i in ('a', 'b')]
  for p in cams:
    files.save_npy_dict(p, {0: np.zeros((2, 2), np.float32)})
  for i in ('a', 'b'):
    files.atomic_write(layout.image_path(c, i), lambda f: Image.new('RGB', (2, 2)).save(f, format='JPEG'))
  st = stages.STAGES['crf']
  assert st.outputs(c) == [layout.crf_path(c, a, i) for i in ('a', 'b') for a in c.infer.crf_alphas]
  state, _, record = runner.check(st, c)
  assert state == 'missing' and record['fields']['infer.crf_alphas'] == list(c.infer.crf_alphas)
  for p in st.outputs(c):
    files.save_npy_dict(p, {})
  assert runner.check(st, c)[:2] == ('stale', ['4 outputs without a record of what made them'])
  provenance.write_record(c.workdir, 'crf', record, 'complete', provenance.fingerprint_outputs(st.outputs(c)))
  assert runner.check(st, c)[0] == 'complete'
  c.infer.crf_iters = 5
  assert runner.check(st, c)[:2] == ('stale', ['infer.crf_iters 10 -> 5'])
  c.infer.crf_iters = 10
  os.remove(cams[0])                                           # an input missing: the stage cannot run yet
  assert runner.check(st, c)[:2] == ('missing', [f'input missing: {cams[0]}'])


def test_variant_pins_inputs_and_derives_outputs(tmp_path):
  c = demo.get_config()
  c.workdir = str(tmp_path / 'run')
  c.infer.cam_dir, c.rw.out_dir, c.infer.checkpoint = '/elsewhere/cam', '/elsewhere/rw', '/w/seam.pth'
  b = stages.baseline_config(c)
  assert b.workdir == str(tmp_path / 'run/baseline') and b.train.method == 'cam' and c.train.method == 'seam'
  for fn in (layout.voc_root, layout.list_dir, layout.cls_labels, layout.gt_dir, layout.init_weights):
    assert fn(b) == fn(c)
  assert layout.cam_dir(b) == str(tmp_path / 'run/baseline/cam') and layout.rw_dir(b) == str(tmp_path /
                                                                                            'run/baseline/rw')
  assert layout.seam_weights(b) == str(tmp_path / 'run/baseline/seam/export')


# ------------------------------------------------------------------------------------------------ baseline loss
def test_cam_loss_is_the_original_classification_loss():
  rng = np.random.default_rng(0)
  cam = rng.normal(size=(2, 6, 5, 21)).astype(np.float32)
  label = np.concatenate([np.ones((2, 1)), rng.random((2, 20)) < 0.3], 1).astype(np.float32)
  loss, metrics = losses.cam_loss((jnp.asarray(cam), jnp.asarray(np.full_like(cam, np.nan))), jnp.asarray(label))
  t = torch.from_numpy(cam.transpose(0, 3, 1, 2))
  ref = F.multilabel_soft_margin_loss(F.adaptive_avg_pool2d(t, (1, 1))[:, 1:, 0, 0], torch.from_numpy(label[:, 1:]))
  # A mean over 2 * 20 terms, each a correctly rounded log-sigmoid of a 30-pixel mean: <= 40 ulp apart.
  np.testing.assert_allclose(float(loss), float(ref), rtol=40 * F32_EPS)
  assert set(metrics) == {'loss', 'cls', 'mlsm'}          # no ER / ECR / AMP: cam_rv (NaN here) never enters


class _StubNet:
  """A stand-in for the SEAM net: fixed (cam, cam_rv) outputs cut to the input's size, calls counted."""

  def __init__(self, cam, rv):
    self.outputs, self.calls = (cam, rv), 0
    self.num_classes = cam.shape[-1]

  def apply(self, variables, x, train, rngs):
    del variables, train, rngs
    self.calls += 1
    return tuple(o[:, :x.shape[1], :x.shape[2]] for o in self.outputs)


def test_train_method_selects_the_loss():
  rng = np.random.default_rng(1)
  cam, rv = (jnp.asarray(rng.random((2, 16, 16, 21), np.float32)) for _ in range(2))
  batch = {'image': jnp.zeros((2, 16, 16, 3)), 'label': jnp.zeros((2, 20)).at[:, 3].set(1.)}
  eq = equivariance.make_equivariance(demo.get_config().train)
  label = seam_task.with_background_label(batch['label'])
  net = _StubNet(cam, jnp.full_like(rv, jnp.nan))        # the baseline never looks at cam_rv
  loss, _ = seam_task.make_loss_fn(eq, 0.2, method='cam')(net, {}, batch, jax.random.PRNGKey(0), 0)
  assert net.calls == 1 and float(loss) == float(losses.cam_loss((cam, rv), label)[0])
  net = _StubNet(cam, rv)
  loss, metrics = seam_task.make_loss_fn(eq, 0.2, method='seam')(net, {}, batch, jax.random.PRNGKey(0), 0)
  assert net.calls == 2 and {'er', 'ecr', 'amp'} <= set(metrics)
  with pytest.raises(errors.DataError, match='train.method'):
    seam_task.make_loss_fn(eq, 0.2, method='camm')


# ------------------------------------------------------------------------------------------------ end to end
class _Html(html.parser.HTMLParser):
  """Image sources, and (data-key, text) of every table cell, of report.html."""

  def __init__(self):
    super().__init__()
    self.srcs, self.cells, self._cell = [], [], None

  def handle_starttag(self, tag, attrs):
    a = dict(attrs)
    if tag == 'img':
      self.srcs.append(a['src'])
    if tag == 'td':
      self._cell = [a.get('data-key'), '']

  def handle_data(self, data):
    if self._cell is not None:
      self._cell[1] += data

  def handle_endtag(self, tag):
    if tag == 'td':
      self.cells.append(tuple(self._cell))
      self._cell = None


def _lookup(tree, key):
  for part in key.split('/'):
    tree = tree[int(part)] if isinstance(tree, list) else tree[part]
  return tree


def _run_pipeline(tmp_path):
  # The baseline's AffinityNet and random walk compile the same programs as the main run's: a compilation cache
  # (inside the workdir) spares the second compilations.
  env = dict(os.environ, TMPDIR=str(tmp_path / 'tmp'), XLA_FLAGS='--xla_force_host_platform_device_count=2',
             JAX_COMPILATION_CACHE_DIR=str(tmp_path / 'work/xla_cache'))
  r = subprocess.run([sys.executable, '-m', 'seam_jax', f'--config={ROOT}/configs/demo.py:tiny',
                      f'--config.workdir={tmp_path}/work', '--config.pipeline.compare_baseline=True'],
                     cwd=tmp_path / 'cwd', env=env, capture_output=True, text=True, timeout=900)
  assert r.returncode == 0, r.stderr[-3000:]
  return r.stdout


def _check_outputs(c):
  ids = layout.read_ids(c, c.infer.list)
  labels = np.load(layout.cls_labels(c), allow_pickle=True).item()
  for i in ids:
    h, w = files.image_size(layout.image_path(c, i))
    cams = files.load_npy_dict(os.path.join(layout.cam_dir(c), i + '.npy'))
    assert sorted(cams) == list(np.flatnonzero(labels[i]))
    for v in cams.values():   # in [0, 1], but the pixels at the class minimum: (-min - 1e-5) / range (QUIRK)
      assert v.dtype == np.float32 and v.shape == (h, w) and v.max() <= 1 and np.unique(v[v < 0]).size <= 1
    for a in c.infer.crf_alphas:
      crf = files.load_npy_dict(os.path.join(layout.crf_dir(c, a), i + '.npy'))
      assert sorted(crf) == [0] + [k + 1 for k in sorted(cams)]
      assert all(v.shape == (h, w) and v.dtype == np.float32 for v in crf.values())
  for i in layout.read_ids(c, c.rw.list):
    with Image.open(os.path.join(layout.rw_dir(c), i + '.png')) as im:
      assert im.mode == 'P' and im.size[::-1] == files.image_size(layout.image_path(c, i))
      assert np.asarray(im).max() <= 20
  for name in ['cam', 'rw'] + [f'crf_{float(a)}' for a in c.infer.crf_alphas]:
    with open(stages.results_path(c, name)) as f:
      res = json.load(f)
    assert 0 <= res['miou'] <= res['miou_present'] <= 1 and len(res['per_class']) == 21
  assert os.path.isfile(os.path.join(layout.eval_dir(c, 'cam'), 'miou_curve.png'))
  for task in ('seam', 'affinity'):
    assert os.path.isfile(os.path.join(layout.export_dir(c, task), 'model.json'))


def _check_report(c):
  out = layout.report_dir(c)
  with open(os.path.join(out, 'summary.json')) as f:
    summary = json.load(f)
  page = _Html()
  with open(os.path.join(out, 'report.html')) as f:
    page.feed(f.read())
  assert page.srcs and all(os.path.isfile(os.path.join(out, s)) for s in page.srcs)
  columns = 4 + len(c.infer.crf_alphas) + 2         # image, truth, CAM, CRFs, random walk; baseline CAM, walk
  assert len([s for s in page.srcs if s.startswith('tiles/pseudo_')]) == c.pipeline.report_images * columns
  numeric = [(k, t) for k, t in page.cells if t.strip().replace('.', '', 1).isdigit()]
  assert all(k for k, _ in numeric), [t for k, t in numeric if not k]    # every number shown has its key
  keys = {k for k, _ in numeric}
  assert all(f'stages/{k}/seconds' in keys for k in range(len(summary['stages'])))
  assert {f'runs/{r}/cam/miou_fixed' for r in ('seam', 'baseline')} <= keys
  for key, text in numeric:                     # every number shown is the summary's
    assert float(text) == _lookup(summary, key), key
  for run, rc in (('seam', c), ('baseline', stages.baseline_config(c))):
    for name in ['cam', 'rw'] + [f'crf_{float(a)}' for a in c.infer.crf_alphas]:
      with open(stages.results_path(rc, name)) as f:
        res = json.load(f)
      got = summary['runs'][run][name]
      assert got['miou'] == round(100 * res['miou'], 1) and got['miou_present'] == round(100 * res['miou_present'], 1)
      assert all(got['per_class'][k] == round(100 * v['iou'], 1) for k, v in res['per_class'].items())
  with open(stages.results_path(c, 'cam')) as f:
    res = json.load(f)
  cam = summary['runs']['seam']['cam']
  k = [round(t, 2) for t in res['thresholds']].index(round(c.infer.bg_threshold, 2))
  assert cam['fixed_threshold'] == round(c.infer.bg_threshold, 2)
  assert cam['miou_fixed'] == round(100 * res['miou_curve'][k], 1)
  names = stages.select('all', c)
  assert [r['stage'] for r in summary['stages']] == names + stages.baseline_stages(names)


@pytest.mark.slow
def test_pipeline_end_to_end(tmp_path):
  for d in ('cwd', 'tmp'):
    os.makedirs(tmp_path / d)
  c = demo.get_config('tiny')
  c.workdir = str(tmp_path / 'work')
  first = _run_pipeline(tmp_path)
  names = stages.select('all', c)
  names += ['baseline/' + n for n in stages.baseline_stages(names)]
  for n in names:
    assert f'] {n}: started' in first and f'] {n}: done in ' in first, n
  b = stages.baseline_config(c)
  _check_outputs(c)
  _check_outputs(b)
  _check_report(c)
  written = [os.path.relpath(os.path.join(d, f), tmp_path) for d, _, fs in os.walk(tmp_path) for f in fs]
  assert written and all(p.startswith('work' + os.sep) for p in written), [p for p in written if
                                                                            not p.startswith('work')]

  again = _run_pipeline(tmp_path)
  lines = [l for l in again.splitlines() if l.startswith('[')]
  assert len(lines) == len(names) and all(l.endswith(')') and ': skipped: outputs complete (' in l for l in lines)
  for n, l in zip(names, lines):
    assert f'] {n}: skipped' in l
  _check_report(c)


# ------------------------------------------------------------------------------------------------ baseline CAMs
def _spec_cams(out, cls):
  """SEAM_SPEC section 4 for one view at scale 1 without mirror: the net's full-size output channels 1..20 of the
  label classes (the image-size resize is the identity), s[s < 0] = 0, per class (s - min - 1e-5) / (max - min + 1e-5)
  with s < min + 1e-5 set to 0."""
  s = np.moveaxis(np.asarray(out, np.float32), -1, 0)[cls]
  s[s < 0] = 0
  mx, mn = s.max((1, 2), keepdims=True), s.min((1, 2), keepdims=True)
  s[s < mn + 1e-5] = 0
  return (s - mn - 1e-5) / (mx - mn + 1e-5), np.abs(s).max((1, 2)) / (mx - mn + 1e-5)[:, 0, 0]


def test_cam_baseline_infers_from_the_cam_branch(tmp_path):
  from seam_jax.data import voc  # pylint: disable=g-import-not-at-top
  from seam_jax.infer import cam_inference  # pylint: disable=g-import-not-at-top
  from seam_jax.models import export  # pylint: disable=g-import-not-at-top
  c = demo.get_config()
  c.workdir = str(tmp_path)
  c.model.width_div = 32
  c.infer.update(list='one', scales=(1.0,), flip=False, bucket=1, batch_size=1, crf_alphas=())
  rng = np.random.default_rng(0)
  jpeg = Image.fromarray(rng.integers(0, 256, (24, 40, 3), np.uint8))
  files.atomic_write(layout.image_path(c, 'x'), lambda f: jpeg.save(f, format='JPEG'))
  img = files.load_image(layout.image_path(c, 'x'))
  voc.write_list(layout.list_path(c, 'one'), ['x'])
  label = np.zeros(20, np.float32)
  label[[2, 5]] = 1
  files.save_npy_dict(layout.cls_labels(c), {'x': label})
  model = models.build('seam', c.model)
  task = types.SimpleNamespace(model_kind='seam', init_input_shape=(24, 40), num_outputs=21)
  variables = trainer.random_init(c, task)(jax.random.PRNGKey(0))
  export.save_export(layout.export_dir(c, 'seam'), variables, 'seam', c.model)
  outputs = jax.jit(model.apply, compiler_options=trainer.compiler_options(True))(variables, voc.normalize(img)[None])
  for method, k in (('cam', 0), ('seam', 1)):       # the baseline's CAMs: cam; SEAM's: cam_rv
    c.train.method, c.infer.cam_dir = method, str(tmp_path / method)
    cam_inference.run_inference(c)
    got = files.load_npy_dict(os.path.join(c.infer.cam_dir, 'x.npy'))
    want, scale = _spec_cams(outputs[k][0, ..., 1:], [2, 5])
    assert sorted(got) == [2, 5]
    for i, cls in enumerate((2, 5)):
      # Both nets sum the same products in another order: the deepest reduction here has 9 * 1024 / 32 = 288 terms,
      # so |error| <= 288 eps * max|s|, divided by the class's range by the normalisation.
      np.testing.assert_allclose(got[cls], want[i], rtol=0, atol=288 * F32_EPS * scale[i])
