"""Multi-scale CAM inference with the SEAM network (SEAM_SPEC section 4).

Per image: views at every scale (+ mirror); the PCM output cam_rv (channels 1..K, K the run's foreground classes:
seam_jax.layout.num_classes, VOC 20) of each view is upsampled to the image size (bilinear, align_corners=False),
multiplied by the image label, un-mirrored and summed; s[s < 0] = 0; per class s[s < min + 1e-5] = 0 and
norm = (s - min - 1e-5) / (max - min + 1e-5). The dict {c: norm[c]} of the label classes is saved as
<cam_dir>/<id>.npy (seam_jax.infer.score_dicts).

Throughput: views of many images are batched together and sharded over this process's devices (with several
processes, each one does its share of the list: seam_jax.common.distributed). To bound the number of compilations on
a data set of varied image sizes, each view is zero-padded (bottom/right) up to multiples of `infer.bucket`, and
views of the same padded shape share a batch and a compiled function (seam_jax.common.bucketing). The padding is
EXACT: `seam_jax.models.seam.PaddedSEAM` masks every spatial conv's input to the view's valid region at that
resolution (so the conv sees the same zeros as its own padding would give), and masks the CAM and the PCM features
at stride 8 (the PCM and its max-normalisation are global over pixels); the per-view resize of the image feeding the
PCM is computed on the host from the unpadded view. So every view's output equals the unpadded network's (up to
float summation order). `infer.bucket = 1` disables padding (one compilation per distinct view shape).
"""
import concurrent.futures
import functools

import jax.numpy as jnp
import numpy as np

from seam_jax import layout
from seam_jax.common import bucketing, files, ops, per_image, visual
from seam_jax.data import input_pipeline
from seam_jax.data import voc
from seam_jax.infer import score_dicts
from seam_jax.models import convert
from seam_jax.models import seam


class CamEngine(bucketing.DeviceLoop):
  """PaddedSEAM with `num_classes` (K + 1) outputs over this process's devices: batch dict {'x', 'valid', 'xs'}
  (see PaddedSEAM) -> cam_rv (or the classifier's cam, `branch='cam'`) at stride 8; one compilation per padded view
  shape."""

  def __init__(self, variables, model_config, batch_size, mesh=None, branch='cam_rv', num_classes=voc.NUM_CLASSES):
    model = seam.PaddedSEAM(model_config.width_div, jnp.dtype(model_config.dtype), branch=branch,
                            num_classes=num_classes)
    super().__init__(lambda v, b: model.apply(v, b['x'], b['valid'], b['xs']),
                     {k: variables[k] for k in ('params', 'batch_stats')}, batch_size, mesh,
                     model_config.fast_compile)


def resize_np(img, hw, align_corners):
  """Bilinear resize of an HWC array with the torch-exact matrices of seam_jax.common.ops (host side)."""
  mh = ops.interp_matrix(img.shape[0], hw[0], align_corners)
  mw = ops.interp_matrix(img.shape[1], hw[1], align_corners)
  return np.einsum('oh,pw,hwc->opc', mh, mw, img, optimize=True).astype(np.float32)


def prepare_views(img, scales, flip, bucket):
  """The inference views of an uint8 HWC image as bucketing pieces: arrays {'x': the normalised view zero-padded
  to the bucket, 'valid': its unpadded (H, W), 'xs': the view at its stride-8 size (align_corners=True),
  zero-padded}, meta ((H, W), flipped), crop = the valid stride-8 region."""
  out = []
  for v, flipped, _ in input_pipeline.inference_views(img, scales, flip):
    h, w = v.shape[:2]
    ph, pw = bucketing.padded(h, bucket), bucketing.padded(w, bucket)
    x = np.zeros((ph, pw, 3), np.float32)
    x[:h, :w] = v
    xs = np.zeros(bucketing.grid_size(ph, pw) + (3,), np.float32)
    low = bucketing.grid_size(h, w)
    xs[:low[0], :low[1]] = resize_np(v, low, True)
    out.append(bucketing.Piece({'x': x, 'valid': np.array([h, w], np.int32), 'xs': xs}, ((h, w), flipped), low))
  return out


@functools.lru_cache(maxsize=512)  # <= 512 x 250 KB at VOC sizes
def upsample_matrix(n_low, n_view, n_out, flip, align_corners=False):
  """(n_out, n_low): the network's align_corners=True upsample to the view size followed by the inference
  resize to the image size (align_corners=False for the CAMs, True for the segmentation test; rows reversed for a
  mirrored view: un-flips the output)."""
  m = (ops.interp_matrix(n_view, n_out, align_corners).astype(np.float64)
       @ ops.interp_matrix(n_low, n_view, True))
  m = np.ascontiguousarray((m[::-1] if flip else m).astype(np.float32))
  m.setflags(write=False)
  return m


def merge_views(outs, hw, label):
  """The spec's CAM dict {c: float32 HxW} of the label classes from per-view stride-8 cam_rv maps.

  outs: [(rv (h, w, K), ((H_v, W_v), flipped))] with rv the valid stride-8 region of a view (what `schedule`
  returns for the pieces of prepare_views).
  """
  cls = np.flatnonzero(np.asarray(label) > 1e-5)
  s = np.zeros((len(cls),) + tuple(hw), np.float32)
  for rv, (vhw, flipped) in outs:
    mh = upsample_matrix(rv.shape[0], vhw[0], hw[0], False)
    mw = upsample_matrix(rv.shape[1], vhw[1], hw[1], bool(flipped))
    r = np.moveaxis(rv[..., cls], -1, 0) * label[cls, None, None].astype(np.float32)
    s += mh @ r @ mw.T
  s[s < 0] = 0
  mx = s.max((1, 2), keepdims=True)
  mn = s.min((1, 2), keepdims=True)
  s[s < mn + 1e-5] = 0
  norm = (s - mn - 1e-5) / (mx - mn + 1e-5)
  return {int(c): norm[i] for i, c in enumerate(cls)}


def _save(config, dataset, image_id, img, cams):
  """The CAM dict, then the optional label PNG (in the DatasetInfo's colours) and overlays of one image; returns
  the number of files written."""
  ic, k = config.infer, dataset.num_classes
  score_dicts.write(layout.cam_path(config, image_id), cams, img.shape[:2], score_dicts.CAM, k)
  label_path = layout.cam_label_path(config, image_id)
  if label_path:
    dataset.save_mask(label_path, score_dicts.threshold_label(cams, img.shape[:2], ic.bg_threshold, k))
  for c, cam in (cams.items() if ic.overlay_dir else ()):
    files.save_rgb_png(layout.cam_overlay_path(config, image_id, c), visual.overlay(img, cam))
  return 1 + bool(label_path) + (len(cams) if ic.overlay_dir else 0)


def cam_branch(config):
  """infer.branch, '' = per train.method: the PCM's cam_rv for SEAM, the classifier's cam for the CAM baseline."""
  return config.infer.branch or ('cam' if config.train.method == 'cam' else 'cam_rv')


def run_inference(config, *, force=False, engine=None):
  """CAM dicts of config.infer.list (seam_jax.common.per_image: this process's share, the images not done yet or
  all with `force`, a barrier at the end). `engine`: a CamEngine (default: the SEAM export, loaded only when there
  is work; num_classes = layout.num_outputs). The dicts hold the run's K classes (layout.dataset). Returns this
  process's stats (per_image.run, + compilations)."""
  ic = config.infer
  if not ic.scales:
    raise ValueError('infer.scales is empty')
  dataset = layout.dataset(config)
  ids = layout.read_ids(config, ic.list)
  labels = voc.labels_for(ids, voc.load_cls_labels(layout.cls_labels(config)), layout.cls_labels(config),
                          dataset.num_classes)

  def load(item):
    image_id, label = item
    img = files.load_image(layout.image_path(config, image_id))
    return image_id, (img, label), prepare_views(img, tuple(ic.scales), ic.flip, ic.bucket)

  def finish(result):
    image_id, (img, label), outs = result
    return _save(config, dataset, image_id, img, merge_views(outs, img.shape[:2], label))

  def work(todo, done):
    eng = engine
    if eng is None:
      outputs = dataset.num_classes + 1
      variables = convert.load_variables(layout.seam_weights(config), 'seam', config.model, outputs)
      eng = CamEngine(variables, config.model, ic.batch_size, branch=cam_branch(config), num_classes=outputs)
    threads = max(int(ic.threads), 1)
    with concurrent.futures.ThreadPoolExecutor(threads) as post:
      per_image.device_loop(eng, todo, load, finish, done, threads, post, max_pending=ic.max_pending)
    return {'compilations': eng.compilations}

  return per_image.run('infer', list(zip(ids, labels)), lambda it: layout.per_image_outputs(config, 'infer', it[0]),
                       work, force, inputs=lambda it: [layout.image_path(config, it[0])])
