"""Inference-side benchmarks: multi-scale + flip CAM inference (the infer stage vs the original's per-view loop in
PyTorch), the random walk (NumPy sparse / dense, JAX sparse / dense, the original's dense squaring in PyTorch) and
the dense CRF (one process vs all cores). CAM inference reads and writes files like the stages do: the generated
set of benchmarks/input.py (`make_dataset`)."""
import functools
import os
import time

import numpy as np

from benchmarks import harness


def _cam_config(size, root, dtype, name):
  from seam_jax import layout  # pylint: disable=g-import-not-at-top
  config = harness.make_config(size, dtype)
  config.workdir = root
  config.data.voc_root = os.path.join(root, 'VOC2012')
  config.infer.cam_dir = os.path.join(root, f'cam_{name}')
  return config, layout


def cam_jax_job(size, root, dtype='float32'):
  """The infer stage (views bucketed and batched on the devices, host threads preparing and merging, CAM files
  written) over the size.images images of the 'bench' list twice: the first pass compiles every padded shape
  (`first_pass_s`, `compilations`), the second is timed (steady state, as a long run over many images)."""
  from seam_jax.infer import cam_inference  # pylint: disable=g-import-not-at-top
  config, _ = _cam_config(size, root, dtype, f'jax_{dtype}')
  variables = harness.jax_variables('seam', config.model)
  engine = cam_inference.CamEngine(variables, config.model, config.infer.batch_size)
  config.infer.list = 'bench'
  t = time.perf_counter()
  warm = cam_inference.run_inference(config, force=True, engine=engine)
  first_s = time.perf_counter() - t
  t = time.perf_counter()
  stats = cam_inference.run_inference(config, force=True, engine=engine)
  dt = time.perf_counter() - t
  return {'seconds': dt / stats['images'], 'img_per_s': stats['images'] / dt, 'first_pass_s': first_s,
          'compilations': warm.get('compilations'),
          'compilations_timed': stats.get('compilations', 0) - warm.get('compilations', 0),
          'views': len(size.scales) * 2, 'device_peak_mb': harness.device_peak_mb()}


def cam_torch_job(size, root, threads=0):
  """The original's infer_SEAM.py loop: per view one forward, cam_rv upsampled to the image (align_corners=False),
  times the label, un-mirrored, summed; min-max normalised per class; saved as the same dict files."""
  import torch  # pylint: disable=g-import-not-at-top
  import torch.nn.functional as F  # pylint: disable=g-import-not-at-top
  from seam_jax.common import files  # pylint: disable=g-import-not-at-top
  from seam_jax.data import input_pipeline, voc  # pylint: disable=g-import-not-at-top
  threads = harness.set_torch_threads(threads)
  config, layout = _cam_config(size, root, 'float32', 'torch')
  dev = harness.torch_device()
  net = harness.torch_net('seam', size.width_div, 0).eval().to(dev)
  labels = voc.load_cls_labels(layout.cls_labels(config))

  @torch.no_grad()
  def one(image_id):
    img = files.load_image(layout.image_path(config, image_id))
    label = np.asarray(labels[image_id], np.float32)
    total = np.zeros((20,) + img.shape[:2], np.float32)
    for view, flipped, _ in input_pipeline.inference_views(img, size.scales, True):
      _, cam = net(torch.from_numpy(np.ascontiguousarray(view.transpose(2, 0, 1))[None]).to(dev))
      cam = F.interpolate(cam[:, 1:], img.shape[:2], mode='bilinear', align_corners=False)[0].cpu().numpy()
      cam = cam * label[:, None, None]
      total += cam[..., ::-1] if flipped else cam
    total[total < 0] = 0
    mx, mn = total.max((1, 2), keepdims=True), total.min((1, 2), keepdims=True)
    total[total < mn + 1e-5] = 0
    norm = (total - mn - 1e-5) / (mx - mn + 1e-5)
    files.save_npy_dict(os.path.join(config.infer.cam_dir, image_id + '.npy'),
                        {i: norm[i] for i in range(20) if label[i] > 1e-5})

  t = time.perf_counter()
  for i in layout.read_ids(config, 'warm'):
    one(i)
  first_s = time.perf_counter() - t
  ids = layout.read_ids(config, 'bench')
  t = time.perf_counter()
  for i in ids:
    one(i)
  dt = time.perf_counter() - t
  return {'seconds': dt / len(ids), 'img_per_s': len(ids) / dt, 'first_image_s': first_s, 'threads': threads,
          'device': dev}


def cam_difference(root):
  """Largest |JAX - PyTorch| over the CAM files both wrote (values in [0, 1])."""
  from seam_jax.infer import score_dicts  # pylint: disable=g-import-not-at-top
  a, b = os.path.join(root, 'cam_jax_float32'), os.path.join(root, 'cam_torch')
  if not (os.path.isdir(a) and os.path.isdir(b)):
    return None
  diff = 0.
  for name in sorted(set(os.listdir(a)) & set(os.listdir(b))):
    x, y = score_dicts.read(os.path.join(a, name)), score_dicts.read(os.path.join(b, name))
    diff = max([diff] + [float(np.abs(x[k] - y[k]).max()) for k in x])
  return diff


# ------------------------------------------------------------------------------------------------ random walk
def _walk_inputs(hw):
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from seam_jax.infer import random_walk as rwm  # pylint: disable=g-import-not-at-top
  from seam_jax.models.affinity import pair_affinity  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(0)
  dh, dw = rwm.grid_size(*hw)
  radius = rwm.walk_radius(*hw, 5)
  feats = jnp.asarray(rng.normal(size=(1, dh, dw, 448)).cumsum(1) * 0.05, jnp.float32)
  aff = np.asarray(pair_affinity(feats, radius))[0]
  cam = {c: rng.random(hw).astype(np.float32) for c in (6, 14)}
  return aff, rwm.pooled_cams(cam, *hw, 6.), radius


def _torch_dense_walk(aff, cams, radius, beta, logt, hw):
  """The original's infer_aff.py on the dense affinity matrix: A**beta, column normalisation, logt squarings,
  cams @ T, bilinear upsampling (align_corners=False) and argmax."""
  import torch  # pylint: disable=g-import-not-at-top
  import torch.nn.functional as F  # pylint: disable=g-import-not-at-top
  from seam_jax.infer import random_walk as rwm  # pylint: disable=g-import-not-at-top
  c, dh, dw = cams.shape
  rows, cols, pair = rwm.edges(dh, dw, radius)
  dense = np.zeros((dh * dw,) * 2, np.float32)
  dense[rows, cols] = np.concatenate([aff.reshape(-1), [1.]])[pair]
  dev = harness.torch_device()
  a, v = torch.from_numpy(dense).to(dev), torch.from_numpy(cams.reshape(c, -1).astype(np.float32)).to(dev)

  def walk():
    t = a ** beta
    t = t / torch.sum(t, dim=0, keepdim=True)
    for _ in range(logt):
      t = t @ t
    rw = (v @ t).view(1, c, dh, dw)
    rw = F.interpolate(rw, (dh * 8, dw * 8), mode='bilinear', align_corners=False)[0, :, :hw[0], :hw[1]]
    return torch.argmax(rw, 0).cpu().numpy()
  return walk


def random_walk_job(size, threads=0, beta=8, logt=6):
  """Seconds per image of each walk implementation (affinities and pooled CAMs given), and label agreement."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from seam_jax.infer import random_walk as rwm  # pylint: disable=g-import-not-at-top
  harness.set_torch_threads(threads)
  hw = size.image_hw
  aff, cams, radius = _walk_inputs(hw)

  def numpy_walk(dense):
    return lambda: rwm.labels_numpy(rwm.random_walk_numpy(aff, cams, radius, beta, logt, dense=dense), hw)[0]

  def jax_walk(method):
    fn = jax.jit(lambda a, c: rwm.labels_jax(rwm.walk_jax(a, c, radius, beta, logt, method))[0])
    a, c = jnp.asarray(aff[None]), jnp.asarray(cams[None], jnp.float32)
    return lambda: np.asarray(fn(a, c))[0, :hw[0], :hw[1]]

  walks = {'numpy_dense': numpy_walk(True), 'numpy_sparse': numpy_walk(False), 'jax_sparse': jax_walk('sparse'),
           'jax_dense': jax_walk('dense'), 'torch_dense': _torch_dense_walk(aff, cams, radius, beta, logt, hw)}
  out = {'nodes': int(cams.shape[1] * cams.shape[2]), 'radius': radius}
  labels = {}
  for name, fn in walks.items():
    out[name], labels[name] = harness.median_time(fn, max(size.steps, 2))
  ref = labels['numpy_sparse']
  out['agreement'] = {k: float(np.mean(v == ref)) for k, v in labels.items()}
  return out


# -------------------------------------------------------------------------------------------------------- CRF
def _crf_item(seed, hw):
  img = harness.synthetic_image(hw, seed)
  yy, xx = np.mgrid[:hw[0], :hw[1]]
  cams = {2: np.clip(1 - np.hypot(yy - hw[0] / 2, xx - hw[1] / 3) / hw[0], 0, 1).astype(np.float32),
          14: np.clip(1 - np.hypot(yy - hw[0] / 3, xx - 2 * hw[1] / 3) / hw[0], 0, 1).astype(np.float32)}
  return cams, img


def _crf_one(seed, hw, alpha):
  from seam_jax.infer import crf  # pylint: disable=g-import-not-at-top
  cams, img = _crf_item(seed, hw)
  return len(crf.cam_to_crf(cams, img, alpha))


def crf_job(size, alpha=4.0):
  """Images/s of the dense CRF (2 classes, 10 iterations) in one process and over all cores (a warm pool)."""
  from seam_jax.common import pools  # pylint: disable=g-import-not-at-top
  n = max(size.images, 2) * 2
  fn = functools.partial(_crf_one, hw=size.image_hw, alpha=alpha)
  fn(0)
  t = time.perf_counter()
  for s in range(n):
    fn(s)
  one = n / (time.perf_counter() - t)
  workers = pools.num_workers(0)
  with pools.process_pool(workers) as ex:
    run = (lambda items: list(ex.map(fn, items))) if ex else (lambda items: [fn(i) for i in items])
    run(range(workers))                               # start the workers and import the library in them
    t = time.perf_counter()
    run(range(n * workers))
    all_cores = n * workers / (time.perf_counter() - t)
  return {'img_per_s_1': one, 'img_per_s_all': all_cores, 'workers': workers, 'hw': list(size.image_hw)}
