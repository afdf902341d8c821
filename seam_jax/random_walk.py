"""Random walk with AffinityNet affinities: CAMs -> refined label maps (SEAM_SPEC section 7).

Per image: the normalised image, zero-padded bottom/right to multiples of 8, gives stride-8 features and the pair
affinities a (within the radius) on the (dh, dw) grid, n = dh * dw nodes. A is the symmetric n x n matrix with
A[from, to] = A[to, from] = a, diagonal 1, zero elsewhere; T = A**beta with every column divided by its sum. The CAMs
(21 channels, background (1 - max fg)**alpha), padded and 8x8 average pooled to (21, n), walk 2**logt steps:
rw = cams @ T^(2**logt). rw is upsampled bilinearly (align_corners=False) to the padded size; label = argmax,
cropped to the image.

The original squares the dense T logt times (logt dense n^3 products). T has at most 2P + 1 non-zeros per column, so
2**logt sparse products v <- v @ T give the same rw far cheaper. Implementations:
  * NumPy/SciPy (host, float64): `walk_sparse` (the default) and `walk_dense` (the original's squaring, for tests
    and the baseline benchmark);
  * JAX (jit, float32, on the accelerator): `walk_jax` with method 'sparse' (gather + sorted segment_sum) or
    'dense' (squaring, matmul precision HIGHEST).
"""
import collections
import concurrent.futures
import contextlib
import functools
import multiprocessing
import os

from absl import logging
import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image
import scipy.sparse
import tqdm

from seam_jax import checkpoints, input_pipeline, models, ops, voc
from seam_jax.affinity_labels import block_mean
from seam_jax.models.affinity import effective_radius, pair_affinity, pair_indices
from seam_jax.voc import NUM_CLASSES

STRIDE = 8


def padded_size(h, w):
  """Image size rounded up to multiples of 8 (the padded network input)."""
  return -(-h // STRIDE) * STRIDE, -(-w // STRIDE) * STRIDE


def grid_size(h, w):
  return -(-h // STRIDE), -(-w // STRIDE)


def walk_radius(h, w, radius):
  """Radius of the pairs on the feature grid of an h x w image (shrunk on small maps)."""
  return effective_radius(*grid_size(h, w), radius)


def pad_image(img, size):
  """Zero-pad an HWC (normalised) image at the bottom/right to `size`."""
  return np.pad(img, ((0, size[0] - img.shape[0]), (0, size[1] - img.shape[1]), (0, 0)))


def cam_scores(cam, h, w, alpha):
  """CAM dict {c (0..19): HxW} -> (h, w, 21) float32: channel c+1 = CAM c (absent: 0), channel 0 =
  (1 - max_c cam_c) ** alpha."""
  out = np.zeros((h, w, NUM_CLASSES), np.float32)
  for c, v in cam.items():
    out[..., int(c) + 1] = v
  out[..., 0] = (1. - out[..., 1:].max(-1)) ** np.float32(alpha)
  return out


def pooled_cams(cam, h, w, alpha):
  """The walk's start: cam_scores zero-padded to multiples of 8 and 8x8 average pooled -> (21, dh, dw)."""
  return np.moveaxis(block_mean(cam_scores(cam, h, w, alpha), STRIDE), -1, 0)


@functools.lru_cache(maxsize=64)
def edges(dh, dw, radius):
  """Non-zeros of A on a (dh, dw) grid as (rows, cols, pair), sorted by column: pair[e] is the index of the edge's
  affinity in pair_affinity's flattened (P * hf * wf) layout, or -1 on the diagonal."""
  n = dh * dw
  if radius < 2:  # no pairs on a (1 or 2)-wide map: the walk keeps the CAMs
    rows = cols = np.arange(n)
    pair = np.full(n, -1)
  else:
    i_from, i_to = pair_indices(dh, dw, radius)
    i_from = np.broadcast_to(i_from, i_to.shape).ravel()
    i_to = i_to.ravel()
    k = np.arange(i_to.size)
    rows = np.concatenate([i_from, i_to, np.arange(n)])
    cols = np.concatenate([i_to, i_from, np.arange(n)])
    pair = np.concatenate([k, k, np.full(n, -1)])
  order = np.argsort(cols, kind='stable')
  return rows[order], cols[order], pair[order]


def edge_values(aff, pair, beta, xp=np):
  """A**beta at the edges: aff (P*hf*wf,) flattened affinities (may be empty), 1 on the diagonal."""
  vals = xp.concatenate([aff.reshape(-1), xp.ones((1,), aff.dtype)])[pair]  # pair -1 -> the appended 1
  return vals ** beta


def transition_sparse(aff, dh, dw, radius, beta):
  """Column-stochastic T = A**beta / column sums, as a SciPy CSR matrix (float64)."""
  rows, cols, pair = edges(dh, dw, radius)
  vals = edge_values(np.asarray(aff, np.float64), pair, beta)
  colsum = np.bincount(cols, vals, minlength=dh * dw)
  return scipy.sparse.csr_matrix((vals / colsum[cols], (rows, cols)), shape=(dh * dw,) * 2)


def walk_sparse(cams, trans, steps):
  """cams (C, n) @ T^steps as `steps` sparse products v <- v @ T (computed as T^T v^T)."""
  tt = trans.T.tocsr()
  v = np.asarray(cams, np.float64).T
  for _ in range(steps):
    v = tt @ v
  return v.T


def walk_dense(cams, trans, logt):
  """The original's algorithm: square the dense T logt times, then cams @ T^(2**logt)."""
  t = trans.toarray() if scipy.sparse.issparse(trans) else np.asarray(trans)
  for _ in range(logt):
    t = t @ t
  return np.asarray(cams, np.float64) @ t


def random_walk_numpy(aff, cams, radius, beta, logt, dense=False):
  """aff (P, hf, wf) pair affinities, cams (21, dh, dw) -> rw (21, dh, dw) float64 (host reference)."""
  c, dh, dw = cams.shape
  trans = transition_sparse(aff, dh, dw, radius, beta)
  flat = cams.reshape(c, -1)
  rw = walk_dense(flat, trans, logt) if dense else walk_sparse(flat, trans, 2 ** logt)
  return rw.reshape(c, dh, dw)


def _taps(n_in, n_out):
  """The two source indices and weights per output index of ops.resize_bilinear (align_corners=False)."""
  m = ops.interp_matrix(n_in, n_out, False)
  i0 = np.argmax(m > 0, axis=1)
  i1 = np.minimum(i0 + 1, n_in - 1)
  rows = np.arange(n_out)
  return i0, i1, m[rows, i0], np.where(i1 > i0, m[rows, i1], 0.).astype(np.float32)


def upsample_numpy(rw, size):
  """(C, dh, dw) -> (C, H, W) bilinear, align_corners=False: ops.resize_bilinear's weights applied as two taps
  per axis (a tenth of the dense interpolation matmuls)."""
  i0, i1, w0, w1 = _taps(rw.shape[1], size[0])
  rw = rw[:, i0] * w0[:, None] + rw[:, i1] * w1[:, None]
  i0, i1, w0, w1 = _taps(rw.shape[2], size[1])
  return rw[:, :, i0] * w0 + rw[:, :, i1] * w1


def labels_numpy(rw, hw):
  """rw (21, dh, dw) -> (uint8 label (h, w), float32 scores (21, h, w)): upsample to the padded size, argmax,
  crop."""
  rw = np.asarray(rw, np.float32)
  scores = upsample_numpy(rw, (rw.shape[1] * STRIDE, rw.shape[2] * STRIDE))[:, :hw[0], :hw[1]]
  return np.argmax(scores, axis=0).astype(np.uint8), scores


def walk_jax(aff, cams, radius, beta, logt, method='sparse'):
  """Batched JAX random walk. aff (B, P, hf, wf), cams (B, 21, dh, dw) -> rw (B, 21, dh, dw) float32.

  'sparse': 2**logt products v <- v @ T, each a gather over the edges and a sorted segment_sum into the columns;
  'dense': the original's logt squarings of the dense T (n^2 memory, n^3 flops each)."""
  b, c, dh, dw = cams.shape
  n = dh * dw
  rows, cols, pair = edges(dh, dw, radius)
  vals = jax.vmap(lambda a: edge_values(a.astype(jnp.float32), pair, beta, jnp))(aff)        # (B, E)
  colsum = jax.vmap(lambda v: jax.ops.segment_sum(v, cols, n, indices_are_sorted=True))(vals)
  t = vals / colsum[:, cols]
  v = cams.reshape(b, c, n).astype(jnp.float32)
  if method == 'dense':
    trans = jax.vmap(lambda tv: jnp.zeros((n, n), jnp.float32).at[rows, cols].set(tv))(t)
    for _ in range(logt):
      trans = jnp.matmul(trans, trans, precision=ops.HIGHEST)
    rw = jnp.matmul(v, trans, precision=ops.HIGHEST)
  elif method == 'sparse':
    def step(_, v):  # out[:, :, j] = sum_{edges e into j} v[:, :, rows[e]] * t[:, e]
      contrib = jnp.moveaxis(v[:, :, rows] * t[:, None], -1, 0)                               # (E, B, C)
      return jnp.moveaxis(jax.ops.segment_sum(contrib, cols, n, indices_are_sorted=True), 0, -1)
    rw = jax.lax.fori_loop(0, 2 ** logt, step, v)
  else:
    raise ValueError(f'unknown random-walk method {method!r}: expected sparse or dense')
  return rw.reshape(b, c, dh, dw)


def labels_jax(rw):
  """rw (B, 21, dh, dw) -> (uint8 labels (B, Hp, Wp), scores (B, Hp, Wp, 21)) at the padded size."""
  b, c, dh, dw = rw.shape
  scores = ops.resize_bilinear(jnp.moveaxis(rw, 1, -1), (dh * STRIDE, dw * STRIDE), align_corners=False)
  return jnp.argmax(scores, axis=-1).astype(jnp.uint8), scores


def make_step(model, config, backend):
  """Jitted per-batch device function for images (B, Hp, Wp, 3) of one padded size (radius config.aff.radius,
  walk parameters config.rw).

  backend 'numpy': (variables, images) -> pair affinities (B, P, hf, wf) (the walk then runs on the host);
  backend 'jax': (variables, images, cams (B, 21, dh, dw)) -> (labels (B, Hp, Wp), scores (B, Hp, Wp, 21) or None
  unless config.rw.save_scores)."""
  def affinities(variables, images):
    feats = model.apply(variables, images, train=False)
    radius = effective_radius(*feats.shape[1:3], config.aff.radius)
    if radius < 2:
      return jnp.zeros((feats.shape[0], 0, 1, 1), jnp.float32)
    return pair_affinity(feats, radius)

  if backend == 'numpy':
    return jax.jit(affinities)
  if backend != 'jax':
    raise ValueError(f'unknown rw.backend {backend!r}: expected numpy or jax')

  def full(variables, images, cams):
    radius = effective_radius(*cams.shape[2:], config.aff.radius)
    rw = walk_jax(affinities(variables, images), cams, radius, config.rw.beta, config.rw.logt,
                  config.rw.jax_method)
    labels, scores = labels_jax(rw)
    return labels, (scores if config.rw.save_scores else None)
  return jax.jit(full)


# ---------------------------------------------------------------------------------------------------------------
# Driver: every image of config.rw.list -> <out_dir>/<id>.png (+ optional <id>.npy score dict).


def image_size(path):
  """(h, w) of an image file from its header; a missing or unreadable file raises DataError naming it."""
  if not os.path.isfile(path):
    raise voc.DataError(f'image not found: {path}')
  try:
    with Image.open(path) as im:
      return im.size[::-1]
  except Exception as e:  # noqa: BLE001
    raise voc.DataError(f'cannot decode image {path}: {e}') from None


def load_cams(path, hw, alpha):
  """Pooled walk input (21, dh, dw) from a CAM dict file, checking its maps match the image size."""
  cam = voc.load_npy_dict(path)
  bad = [c for c, v in cam.items() if np.shape(v) != tuple(hw) or not 0 <= int(c) < voc.NUM_FG]
  if bad:
    raise voc.DataError(f'{path}: CAM entries {bad[:3]} are not classes 0..19 of the image size {tuple(hw)}')
  return cam, pooled_cams(cam, *hw, alpha)


def save_result(out_dir, image_id, label, scores, cam, save_scores):
  """<id>.npy (dict {0: bg, c+1: class c} of walk scores, present classes only; optional), then <id>.png (the
  resume marker, so it goes last)."""
  if save_scores:
    voc.save_npy_dict(os.path.join(out_dir, image_id + '.npy'),
                      {0: scores[0], **{int(c) + 1: scores[int(c) + 1] for c in sorted(cam)}})
  voc.save_label_png(os.path.join(out_dir, image_id + '.png'), label)


def _host_walk(job):
  """Worker: the NumPy walk of one image from its pair affinities, saved. Returns the id."""
  image_id, aff, hw, cam_path, rw, radius = job
  cam, cams = load_cams(cam_path, hw, rw['alpha'])
  walked = random_walk_numpy(aff, cams, walk_radius(*hw, radius), rw['beta'], rw['logt'])
  label, scores = labels_numpy(walked, hw)
  save_result(rw['out_dir'], image_id, label, scores, cam, rw['save_scores'])
  return image_id


def batches_by_size(ids, sizes, batch_size):
  """Ids grouped by padded size (one compilation each), in chunks of at most batch_size."""
  groups = {}
  for i in ids:
    groups.setdefault(padded_size(*sizes[i]), []).append(i)
  return [(size, g[k:k + batch_size]) for size, g in sorted(groups.items()) for k in range(0, len(g), batch_size)]


def image_batches(config, batches, batch_size):
  """Yield normalised padded images (batch_size, Hp, Wp, 3) per (size, chunk), decoded ahead in threads; a short
  chunk repeats its last image (those outputs are unused)."""
  images = input_pipeline.iterate_images(config.data.voc_root, [i for _, chunk in batches for i in chunk])
  for size, chunk in batches:
    imgs = [pad_image(voc.normalize(next(images)[1]), size) for _ in chunk]
    yield np.stack(imgs + imgs[-1:] * (batch_size - len(imgs)))


def run(config):
  """Random walk over config.rw.list with the AffinityNet export; skips finished ids unless config.rw.force."""
  rw = config.rw
  ids = voc.read_list(voc.resolve_list(rw.list, config.data.list_dir))
  cam_dir = rw.cam_dir or config.infer.cam_dir
  todo = [i for i in ids if rw.force or not os.path.exists(os.path.join(rw.out_dir, i + '.png'))]
  logging.info('random walk: %d of %d images to do -> %s (backend %s)', len(todo), len(ids), rw.out_dir, rw.backend)
  if not todo:
    return
  cam_paths = {i: os.path.join(cam_dir, i + '.npy') for i in todo}
  missing = [p for p in cam_paths.values() if not os.path.isfile(p)]
  if missing:
    raise voc.DataError(f'{len(missing)} CAM files missing in {cam_dir}, e.g. {missing[0]}')
  ckpt = rw.checkpoint or os.path.join(config.workdir, 'affinity', 'export')
  variables = checkpoints.load_variables(ckpt, 'affinity', config.model)
  step = make_step(models.build('affinity', config.model), config, rw.backend)
  sizes = {i: image_size(input_pipeline.image_path(config.data.voc_root, i)) for i in todo}
  job_rw = {k: rw[k] for k in ('alpha', 'beta', 'logt', 'out_dir', 'save_scores')}
  bs = max(int(rw.batch_size), 1)
  workers = (int(rw.workers) or os.cpu_count()) if rw.backend == 'numpy' else 1
  pool = (concurrent.futures.ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context('spawn'))
          if workers > 1 else None)   # spawn: the parent process holds JAX
  pending = collections.deque()
  with tqdm.tqdm(total=len(todo), desc='random walk') as bar, pool or contextlib.nullcontext():
    batches = batches_by_size(todo, sizes, bs)
    for (_, chunk), x in zip(batches, image_batches(config, batches, bs)):
      if rw.backend == 'numpy':
        aff = np.asarray(step(variables, x))
        for k, i in enumerate(chunk):
          job = (i, aff[k], sizes[i], cam_paths[i], job_rw, config.aff.radius)
          pending.append(pool.submit(_host_walk, job) if pool else _done(_host_walk(job)))
        while len(pending) > 2 * workers:  # bound the affinities held in flight
          pending.popleft().result()
          bar.update()
      else:
        loaded = [load_cams(cam_paths[i], sizes[i], rw.alpha) for i in chunk]
        cams = np.stack([c for _, c in loaded] + [loaded[-1][1]] * (bs - len(chunk)))
        labels, scores = jax.device_get(step(variables, x, cams))
        for k, i in enumerate(chunk):
          (h, w), cam = sizes[i], loaded[k][0]
          sc = None if scores is None else np.moveaxis(scores[k, :h, :w], -1, 0)
          save_result(rw.out_dir, i, labels[k, :h, :w], sc, cam, rw.save_scores)
          bar.update()
    while pending:
      pending.popleft().result()
      bar.update()


def _done(value):
  f = concurrent.futures.Future()
  f.set_result(value)
  return f
