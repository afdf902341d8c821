"""Multi-scale CAM inference with the SEAM network (SEAM_SPEC section 4).

Per image: views at every scale (+ mirror); the PCM output cam_rv (channels 1..20) of each view is upsampled to the
image size (bilinear, align_corners=False), multiplied by the image label, un-mirrored and summed; s[s < 0] = 0;
per class s[s < min + 1e-5] = 0 and norm = (s - min - 1e-5) / (max - min + 1e-5). The dict {c: norm[c]} of the
label classes is saved as <cam_dir>/<id>.npy.

Throughput: views of many images are batched together and sharded over all devices. To bound the number of
compilations on a data set of varied image sizes, each view is zero-padded (bottom/right) up to multiples of
`infer.bucket`, and views of the same padded shape share a batch and a compiled function. The padding is EXACT:
`PaddedSEAM` masks every spatial conv's input to the view's valid region at that resolution (so the conv sees the
same zeros as its own padding would give), and masks the CAM and the PCM features at stride 8 (the PCM and its
max-normalisation are global over pixels); the per-view resize of the image feeding the PCM is computed on the host
from the unpadded view. So every view's output equals the unpadded network's (up to float summation order).
`infer.bucket = 1` disables padding (one compilation per distinct view shape).
"""
import collections
import concurrent.futures
import dataclasses
import functools
import os
import time

from absl import logging
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image
from tqdm import tqdm

from seam_jax import checkpoints
from seam_jax import evaluation
from seam_jax import input_pipeline
from seam_jax import ops
from seam_jax import voc
from seam_jax.models import seam
from seam_jax.models.resnet38 import ResNet38

STRIDE = 8  # network output stride: three stride-2 stages, each ceil(n / 2)


def _level_sizes(n):
  """Spatial sizes reached from n by successive stride-2 steps (ceil(n / 2) each)."""
  sizes = [n]
  while sizes[-1] > 1:
    sizes.append(-(-sizes[-1] // 2))
  return sizes


def valid_mask(valid, full_hw, hw):
  """(B, h, w, 1) bool: the valid region of each view at feature size `hw`, reached from the padded input size
  `full_hw` by k stride-2 steps; `valid` (B, 2) holds the unpadded (H, W), valid size at level k = ceil(H / 2^k)."""
  masks = []
  for axis in range(2):
    k = _level_sizes(full_hw[axis]).index(hw[axis])
    n = (valid[:, axis] + 2 ** k - 1) // 2 ** k
    masks.append(jnp.arange(hw[axis])[None, :] < n[:, None])
  return (masks[0][:, :, None] & masks[1][:, None, :])[..., None]


def _mask_spatial_conv_inputs(valid, full_hw):
  """Flax interceptor: zero the padding of the input of every conv with a kernel larger than 1x1."""
  def interceptor(next_fn, args, kwargs, context):
    mod = context.module
    if isinstance(mod, nn.Conv) and context.method_name == '__call__' and max(mod.kernel_size) > 1:
      x = args[0]
      args = (x * valid_mask(valid, full_hw, x.shape[1:3]).astype(x.dtype),) + tuple(args[1:])
    return next_fn(*args, **kwargs)
  return interceptor


class PaddedSEAM(nn.Module):
  """SEAM's eval forward on zero-padded views, exact on each view's valid region (same parameter tree as SEAM).

  It re-states SEAM's head (reusing its layers and functions) because the masks must reach inside it and the
  stride-8 cam_rv is wanted before SEAM's upsampling; tests compare it with `SEAM` on unpadded views.
  x (B, Hp, Wp, 3) normalised padded views, valid (B, 2) unpadded (H, W), xs (B, Hp/8, Wp/8, 3) each view resized
  to its stride-8 size (align_corners=True), zero-padded. Returns cam_rv channels 1..20 at stride 8,
  (B, Hp/8, Wp/8, 20) float32, meaningful on [:ceil(H/8), :ceil(W/8)].
  """
  width_div: int = 1
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x, valid, xs):
    w = lambda c: max(c // self.width_div, 1)
    with nn.intercept_methods(_mask_spatial_conv_inputs(valid, x.shape[1:3])):
      d = ResNet38(self.width_div, self.dtype, name='backbone')(x)
    m8 = valid_mask(valid, x.shape[1:3], d['conv6'].shape[1:3])
    cam = seam.conv1x1(voc.NUM_CLASSES, 'fc8', seam.xavier(), self.dtype)(d['conv6']).astype(jnp.float32)
    cdn = seam.normalized_fg_cam(jnp.where(m8, cam, 0.))  # relu'd max over valid pixels only
    f8_3 = nn.relu(seam.conv1x1(w(64), 'f8_3', seam.kaiming, self.dtype)(d['conv4']))
    f8_4 = nn.relu(seam.conv1x1(w(128), 'f8_4', seam.kaiming, self.dtype)(d['conv5']))
    f = jnp.concatenate([xs.astype(jnp.float32), f8_3.astype(jnp.float32), f8_4.astype(jnp.float32)], axis=-1)
    f = seam.conv1x1(w(192), 'f9', seam.xavier_gain4, self.dtype)(f)
    rv = seam.pcm(cdn, jnp.where(m8, f, 0))  # zero features: padding pixels have zero affinity
    return rv[..., 1:]


class CamEngine:
  """PaddedSEAM jitted over a 1-D device mesh (batch sharded, weights replicated), with an explicit cache of
  compiled executables: one compilation per padded view shape, counted in `compilations`."""

  def __init__(self, variables, model_config, batch_size, mesh=None):
    self.mesh = mesh or jax.make_mesh((jax.device_count(),), ('data',))
    n = self.mesh.size
    self.batch_size = -(-int(batch_size) // n) * n
    model = PaddedSEAM(model_config.width_div, jnp.dtype(model_config.dtype))
    repl = jax.sharding.NamedSharding(self.mesh, jax.sharding.PartitionSpec())
    self._data = jax.sharding.NamedSharding(self.mesh, jax.sharding.PartitionSpec('data'))
    self.variables = jax.device_put({k: variables[k] for k in ('params', 'batch_stats')}, repl)
    self._forward = jax.jit(model.apply, in_shardings=(repl, self._data, self._data, self._data),
                            out_shardings=self._data)
    self._compiled = {}

  @property
  def compilations(self):
    return len(self._compiled)

  def compile(self, shape):
    """The executable for padded views of `shape` (H, W), compiled on first use."""
    shape = tuple(int(v) for v in shape)
    if shape not in self._compiled:
      b, lh, lw = self.batch_size, low_res(shape[0]), low_res(shape[1])
      spec = lambda s, t: jax.ShapeDtypeStruct(s, t, sharding=self._data)
      self._compiled[shape] = self._forward.lower(
          self.variables, spec((b,) + shape + (3,), jnp.float32), spec((b, 2), jnp.int32),
          spec((b, lh, lw, 3), jnp.float32)).compile()
    return self._compiled[shape]

  def __call__(self, x, valid, xs):
    """Dispatch one batch (numpy, leading dim = batch_size); returns a device array without waiting."""
    return self.compile(x.shape[1:3])(self.variables, x, valid, xs)


@dataclasses.dataclass
class View:
  x: np.ndarray        # (Hp, Wp, 3) normalised, zero-padded
  hw: tuple            # unpadded (H, W)
  xs: np.ndarray       # (Hp/8, Wp/8, 3) the view at its stride-8 size (align_corners=True), zero-padded
  flipped: bool


def low_res(n):
  return -(-n // STRIDE)


def padded(n, bucket):
  """n rounded up to a multiple of `bucket` (and of the stride, so the stride-8 map tiles the padded view)."""
  b = int(np.lcm(max(int(bucket), 1), STRIDE)) if bucket > 1 else 1
  return -(-n // b) * b


def resize_np(img, hw, align_corners):
  """Bilinear resize of an HWC array with the torch-exact matrices of seam_jax.ops (host side)."""
  mh = ops.interp_matrix(img.shape[0], hw[0], align_corners)
  mw = ops.interp_matrix(img.shape[1], hw[1], align_corners)
  return np.einsum('oh,pw,hwc->opc', mh, mw, img, optimize=True).astype(np.float32)


def prepare_views(img, scales, flip, bucket):
  """The inference views of an uint8 HWC image, padded for bucketing (see module doc)."""
  out = []
  for v, flipped, _ in input_pipeline.inference_views(img, scales, flip):
    h, w = v.shape[:2]
    ph, pw = padded(h, bucket), padded(w, bucket)
    x = np.zeros((ph, pw, 3), np.float32)
    x[:h, :w] = v
    xs = np.zeros((low_res(ph), low_res(pw), 3), np.float32)
    xs[:low_res(h), :low_res(w)] = resize_np(v, (low_res(h), low_res(w)), True)
    out.append(View(x, (h, w), xs, flipped))
  return out


@functools.lru_cache(maxsize=512)  # <= 512 x 250 KB at VOC sizes
def upsample_matrix(n_low, n_view, n_out, flip):
  """(n_out, n_low): the network's align_corners=True upsample to the view size followed by the inference
  align_corners=False resize to the image size (rows reversed for a mirrored view: un-flips the output)."""
  m = (ops.interp_matrix(n_view, n_out, False).astype(np.float64)
       @ ops.interp_matrix(n_low, n_view, True))
  m = np.ascontiguousarray((m[::-1] if flip else m).astype(np.float32))
  m.setflags(write=False)
  return m


def merge_views(outs, hw, label):
  """The spec's CAM dict {c: float32 HxW} of the label classes from per-view stride-8 cam_rv maps.

  outs: [(rv (h, w, 20), view (H_v, W_v), flipped)] with rv the valid stride-8 region of a view.
  """
  cls = np.flatnonzero(np.asarray(label) > 1e-5)
  s = np.zeros((len(cls),) + tuple(hw), np.float32)
  for rv, vhw, flipped in outs:
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


def overlay(img, cam, alpha=0.5):
  """uint8 image blended with the jet colour map of a [0, 1] CAM."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  heat = matplotlib.colormaps['jet'](np.clip(cam, 0, 1))[..., :3] * 255
  return (alpha * img + (1 - alpha) * heat).astype(np.uint8)


def _prefetch(fn, items, ex, depth):
  """fn over items in executor `ex`, results in order, at most `depth` ahead."""
  q = collections.deque()
  for it in items:
    q.append(ex.submit(fn, it))
    if len(q) > depth:
      yield q.popleft().result()
  while q:
    yield q.popleft().result()


class _Record:
  def __init__(self, key, payload, num_views):
    self.key, self.payload = key, payload
    self.outs = [None] * num_views
    self.left = num_views


def schedule(engine, items, max_pending=16, depth=2):
  """Run the views of every item through `engine`, batching views of equal padded shape across images.

  items: iterable of (key, payload, [View]). Yields (key, payload, [(rv, hw, flipped)]) as images complete.
  At most `max_pending` images wait for their batches (then the oldest one's shapes are flushed partially
  filled) and `depth` batches are in flight on the devices while the host prepares the next.
  """
  b = engine.batch_size
  buffers = collections.OrderedDict()  # padded shape -> [(record, view index, View)]
  pending = collections.OrderedDict()  # id(record) -> record, oldest first
  inflight = collections.deque()

  def dispatch(shape):
    entries = buffers.pop(shape)
    x = np.zeros((b,) + shape + (3,), np.float32)
    xs = np.zeros((b, low_res(shape[0]), low_res(shape[1]), 3), np.float32)
    valid = np.tile(np.array(shape, np.int32), (b, 1))
    for k, (_, _, v) in enumerate(entries):
      x[k], xs[k], valid[k] = v.x, v.xs, v.hw
    inflight.append((entries, engine(x, valid, xs)))

  def resolve():
    entries, out = inflight.popleft()
    out = np.asarray(jax.device_get(out))
    for k, (rec, vi, v) in enumerate(entries):
      rec.outs[vi] = (out[k, :low_res(v.hw[0]), :low_res(v.hw[1])], v.hw, v.flipped)
      rec.left -= 1
      if not rec.left:
        del pending[id(rec)]
        yield rec.key, rec.payload, rec.outs

  def drain(limit):
    while len(inflight) > limit:
      yield from resolve()

  for key, payload, views in items:
    rec = _Record(key, payload, len(views))
    pending[id(rec)] = rec
    for vi, v in enumerate(views):
      shape = v.x.shape[:2]
      buffers.setdefault(shape, []).append((rec, vi, v))
      if len(buffers[shape]) == b:
        dispatch(shape)
        yield from drain(depth)
    while len(pending) > max_pending:
      oldest = next(iter(pending.values()))
      shape = next((s for s, es in buffers.items() if any(e[0] is oldest for e in es)), None)
      if shape is not None:
        dispatch(shape)
        yield from drain(depth)
      elif inflight:  # all its views are on the devices: wait for the oldest batch
        yield from drain(len(inflight) - 1)
      else:
        raise AssertionError('scheduler: a pending image has no view left to run')
  for shape in list(buffers):
    dispatch(shape)
    yield from drain(depth)
  yield from drain(0)


def checkpoint_path(config):
  return config.infer.checkpoint or os.path.join(config.workdir, 'seam', 'export')


def _output_paths(ic, image_id):
  paths = {'cam': os.path.join(ic.cam_dir, image_id + '.npy')}
  if ic.label_dir:
    paths['label'] = os.path.join(ic.label_dir, image_id + '.png')
  return paths


def _save(ic, image_id, img, cams):
  paths = _output_paths(ic, image_id)
  voc.save_npy_dict(paths['cam'], cams)
  if 'label' in paths:
    voc.save_label_png(paths['label'], evaluation.cam_to_label(cams, img.shape[:2], ic.bg_threshold))
  for c, cam in (cams.items() if ic.overlay_dir else ()):
    path = os.path.join(ic.overlay_dir, f'{image_id}_{voc.CLASSES[c + 1]}.png')
    _save_png(path, overlay(img, cam))


def _save_png(path, arr):
  """RGB PNG, atomically (temp file then rename)."""
  os.makedirs(os.path.dirname(path) or '.', exist_ok=True)
  tmp = f'{path}.tmp.{os.getpid()}.png'
  Image.fromarray(arr).save(tmp)
  os.replace(tmp, path)


def run_inference(config, engine=None):
  """CAM dicts for every id of config.infer.list not done yet (all with infer.force). Returns stats."""
  ic = config.infer
  if not ic.scales:
    raise ValueError('infer.scales is empty')
  ids = voc.read_list(voc.resolve_list(ic.list, config.data.list_dir))
  labels = voc.labels_for(ids, voc.load_cls_labels(config.data.cls_labels), config.data.cls_labels)
  todo = [(i, l) for i, l in zip(ids, labels)
          if ic.force or not all(os.path.isfile(p) for p in _output_paths(ic, i).values())]
  stats = {'images': len(todo), 'skipped': len(ids) - len(todo), 'seconds': 0., 'img_per_s': 0.}
  if not todo:
    logging.info('infer: all %d images of %s are done (infer.force recomputes)', len(ids), ic.list)
    return stats
  if engine is None:
    variables = checkpoints.load_variables(checkpoint_path(config), 'seam', config.model)
    engine = CamEngine(variables, config.model, ic.batch_size)
  voc_root = config.data.voc_root

  def load(item):
    image_id, label = item
    img = voc.load_image(input_pipeline.image_path(voc_root, image_id))
    return image_id, (img, label), prepare_views(img, tuple(ic.scales), ic.flip, ic.bucket)

  def finish(image_id, img, label, outs):
    _save(ic, image_id, img, merge_views(outs, img.shape[:2], label))

  t0 = time.time()
  threads = max(int(ic.threads), 1)
  with concurrent.futures.ThreadPoolExecutor(threads) as prep, \
       concurrent.futures.ThreadPoolExecutor(threads) as post, \
       tqdm(total=len(todo), desc='cam', unit='img') as bar:
    saving = collections.deque()
    for image_id, (img, label), outs in schedule(engine, _prefetch(load, todo, prep, 2 * threads), ic.max_pending):
      saving.append(post.submit(finish, image_id, img, label, outs))
      while saving and (saving[0].done() or len(saving) > 2 * threads):
        saving.popleft().result()
        bar.update(1)
    while saving:
      saving.popleft().result()
      bar.update(1)
  dt = time.time() - t0
  stats.update(seconds=dt, img_per_s=len(todo) / dt, compilations=engine.compilations)
  logging.info('infer: %d images in %.1f s (%.2f img/s, %d compilations); %d skipped; CAMs in %s',
               len(todo), dt, len(todo) / dt, engine.compilations, stats['skipped'], ic.cam_dir)
  return stats
