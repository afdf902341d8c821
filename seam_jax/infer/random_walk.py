"""Random walk with AffinityNet affinities: CAMs -> refined label maps (SEAM_SPEC section 7).

Per image: the normalised image, zero-padded bottom/right to multiples of 8, gives stride-8 features and the pair
affinities a (within the radius) on the (dh, dw) grid, n = dh * dw nodes. A is the symmetric n x n matrix with
A[from, to] = A[to, from] = a, diagonal 1, zero elsewhere; T = A**beta with every column divided by its sum. The CAMs
(C = K + 1 channels for the run's K classes, VOC 21; background (1 - max fg)**alpha), padded and 8x8 average
pooled to (C, n), walk 2**logt steps:
rw = cams @ T^(2**logt). rw is upsampled bilinearly (align_corners=False) to the padded size; label = argmax,
cropped to the image.

The original squares the dense T logt times (logt dense n^3 products). T has at most 2P + 1 non-zeros per column, so
2**logt sparse products v <- v @ T give the same rw far cheaper. Implementations:
  * NumPy/SciPy (host, float64): `walk_sparse` (the default) and `walk_dense` (the original's squaring, for tests
    and the baseline benchmark);
  * JAX (jit, float32, on the accelerator): `walk_jax` with method 'sparse' (gather + sorted segment_sum) or
    'dense' (squaring, matmul precision HIGHEST).
"""
import functools
import os

import jax
import jax.numpy as jnp
import numpy as np
import scipy.sparse

from seam_jax import layout
from seam_jax import models
from seam_jax.common import bucketing, files, ops, per_image, pools
from seam_jax.common.bucketing import STRIDE, grid_size
from seam_jax.data import voc
from seam_jax.data.dataset_info import DatasetInfo
from seam_jax.infer import score_dicts
from seam_jax.models import convert
from seam_jax.models.affinity import effective_radius, pair_affinity, pair_indices
from seam_jax.train.affinity_labels import block_mean


def walk_radius(h, w, radius):
  """Radius of the pairs on the feature grid of an h x w image (shrunk on small maps)."""
  return effective_radius(*grid_size(h, w), radius)


def pad_image(img, size):
  """Zero-pad an HWC (normalised) image at the bottom/right to `size`."""
  return np.pad(img, ((0, size[0] - img.shape[0]), (0, size[1] - img.shape[1]), (0, 0)))


def pooled_cams(cam, h, w, alpha, num_classes=score_dicts.NUM_FG):
  """The walk's start: the dense channels of a CAM dict of K = num_classes classes with background
  (score_dicts.dense_power_stack), zero-padded to multiples of 8 and 8x8 average pooled -> (K + 1, dh, dw)."""
  dense = np.ascontiguousarray(np.moveaxis(score_dicts.dense_power_stack(cam, (h, w), alpha, num_classes), 0, -1))
  return np.moveaxis(block_mean(dense, STRIDE), -1, 0)


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


def present_channels(cams):
  """Indices of the channels of cams (C, ...) with a nonzero value, channel 0 (background) always included: the
  walk and the upsampling are linear per channel, so the other channels stay exactly zero and can be skipped (an
  image holds 1-3 of VOC's 20 classes: the walk costs a few channels, not 21)."""
  flat = np.asarray(cams).reshape(len(cams), -1)
  return np.flatnonzero((np.abs(flat).max(axis=1) > 0) | (np.arange(len(flat)) == 0))


def random_walk_numpy(aff, cams, radius, beta, logt, dense=False):
  """aff (P, hf, wf) pair affinities, cams (C, dh, dw) -> rw (C, dh, dw) float64 (host reference); only the
  present channels are walked (present_channels)."""
  c, dh, dw = cams.shape
  trans = transition_sparse(aff, dh, dw, radius, beta)
  keep = present_channels(cams)
  flat = cams.reshape(c, -1)[keep]
  rw = np.zeros((c, dh * dw), np.float64)
  rw[keep] = walk_dense(flat, trans, logt) if dense else walk_sparse(flat, trans, 2 ** logt)
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
  """rw (C, dh, dw) -> (uint8 label (h, w), float32 scores (C, h, w)): upsample to the padded size, argmax,
  crop. Only the present channels are upsampled: the others are zero, and where every channel is zero both
  argmaxes give channel 0, which is always present."""
  rw = np.asarray(rw, np.float32)
  keep = present_channels(rw)
  up = upsample_numpy(rw[keep], (rw.shape[1] * STRIDE, rw.shape[2] * STRIDE))[:, :hw[0], :hw[1]]
  scores = np.zeros((len(rw), hw[0], hw[1]), np.float32)
  scores[keep] = up
  return keep[np.argmax(up, axis=0)].astype(np.uint8), scores


def walk_jax(aff, cams, radius, beta, logt, method='sparse'):
  """Batched JAX random walk. aff (B, P, hf, wf), cams (B, C, dh, dw) -> rw (B, C, dh, dw) float32.

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
  """rw (B, C, dh, dw) -> (uint8 labels (B, Hp, Wp), scores (B, Hp, Wp, C)) at the padded size."""
  b, c, dh, dw = rw.shape
  scores = ops.resize_bilinear(jnp.moveaxis(rw, 1, -1), (dh * STRIDE, dw * STRIDE), align_corners=False)
  return jnp.argmax(scores, axis=-1).astype(jnp.uint8), scores


def make_step(model, config, backend):
  """The per-batch device function fn(variables, batch) for images of one padded size (radius config.aff.radius,
  walk parameters config.rw); batch['image'] (B, Hp, Wp, 3) normalised, zero-padded.

  backend 'numpy': -> pair affinities (B, P, hf, wf) (the walk then runs on the host);
  backend 'jax': with batch['cams'] (B, C, dh, dw) -> (labels (B, Hp, Wp), scores (B, Hp, Wp, C) or None
  unless config.rw.save_scores)."""
  def affinities(variables, images):
    feats = model.apply(variables, images, train=False)
    radius = effective_radius(*feats.shape[1:3], config.aff.radius)
    if radius < 2:
      return jnp.zeros((feats.shape[0], 0, 1, 1), jnp.float32)
    return pair_affinity(feats, radius)

  if backend == 'numpy':
    return lambda variables, batch: affinities(variables, batch['image'])
  if backend != 'jax':
    raise ValueError(f'unknown rw.backend {backend!r}: expected numpy or jax')

  def full(variables, batch):
    cams = batch['cams']
    radius = effective_radius(*cams.shape[2:], config.aff.radius)
    rw = walk_jax(affinities(variables, batch['image']), cams, radius, config.rw.beta, config.rw.logt,
                  config.rw.jax_method)
    labels, scores = labels_jax(rw)
    return labels, (scores if config.rw.save_scores else None)
  return full


# ---------------------------------------------------------------------------------------------------------------
# Driver: every image of config.rw.list -> <out_dir>/<id>.png (+ with rw.save_scores the <id>.npy score dict).
def load_cams(path, hw, alpha, num_classes=score_dicts.NUM_FG):
  """(CAM dict, pooled walk input (K + 1, dh, dw)) of a CAM file of K = num_classes classes, checked against the
  image size."""
  cam = score_dicts.read(path, hw, score_dicts.CAM, num_classes)
  return cam, pooled_cams(cam, *hw, alpha, num_classes)


def save_result(paths, label, scores, cam, dataset=DatasetInfo.VOC):
  """paths (label PNG, score file or None): the score dict {0: bg, c+1: class c} of the present classes (when
  asked), then the label PNG in the colours of `dataset` (a DatasetInfo: K classes). Returns the number of files
  written."""
  label_path, score_path = paths
  if score_path:
    score_dicts.write(score_path, {0: scores[0], **{int(c) + 1: scores[int(c) + 1] for c in sorted(cam)}},
                      label.shape, score_dicts.SCORES, dataset.num_classes)
  dataset.save_mask(label_path, label)
  return 1 + bool(score_path)


def _host_walk(result, walk, radius, dataset):
  """Worker (backend numpy): the NumPy walk of one image from its pair affinities, saved; returns files written."""
  _, (hw, cam_path, paths), [(aff, _)] = result
  cam, cams = load_cams(cam_path, hw, walk['alpha'], dataset.num_classes)
  walked = random_walk_numpy(aff, cams, walk_radius(*hw, radius), walk['beta'], walk['logt'])
  label, scores = labels_numpy(walked, hw)
  return save_result(paths, label, scores, cam, dataset)


def _save_device_walk(result, dataset):
  """Backend jax: save the labels (and scores) the device computed, cropped to the image by the scheduler."""
  _, (_, cam, paths), [((label, scores), _)] = result
  return save_result(paths, label, None if scores is None else np.moveaxis(scores, -1, 0), cam, dataset)


def run(config, *, force=False):
  """Random walk over config.rw.list with the AffinityNet export (seam_jax.common.per_image: this process's share,
  the images whose label PNG or, with rw.save_scores, score file is missing, or all with `force`; a barrier at the
  end). Returns this process's stats (per_image.run)."""
  outputs = lambda i: layout.per_image_outputs(config, 'rw', i)
  return per_image.run('rw', layout.read_ids(config, config.rw.list), outputs, functools.partial(_walk, config), force,
                       inputs=lambda i: [layout.rw_cam_path(config, i)])


def _walk(config, todo, done):
  """The walk of the ids of `todo`: AffinityNet on the devices, the walk there (backend jax) or in a process pool
  of rw.workers (numpy), over the run's K + 1 channels (layout.dataset); done(files) per image."""
  rw, dataset = config.rw, layout.dataset(config)
  variables = convert.load_variables(layout.affinity_weights(config), 'affinity', config.model)
  loop = bucketing.DeviceLoop(make_step(models.build('affinity', config.model), config, rw.backend), variables,
                              rw.batch_size, fast_compile=config.model.fast_compile)
  sizes = {i: files.image_size(layout.image_path(config, i)) for i in todo}
  todo = sorted(todo, key=lambda i: bucketing.padded_size(*sizes[i]))   # equal padded sizes in a row: full batches
  on_host = rw.backend == 'numpy'
  paths = lambda i: (layout.rw_path(config, i), layout.rw_score_path(config, i) if rw.save_scores else None)

  def load(i):
    hw = sizes[i]
    arrays = {'image': pad_image(voc.normalize(files.load_image(layout.image_path(config, i))),
                                 bucketing.padded_size(*hw))}
    if on_host:
      return i, (hw, layout.rw_cam_path(config, i), paths(i)), [bucketing.Piece(arrays)]
    cam, arrays['cams'] = load_cams(layout.rw_cam_path(config, i), hw, rw.alpha, dataset.num_classes)
    return i, (hw, cam, paths(i)), [bucketing.Piece(arrays, crop=hw)]

  if on_host:
    finish = functools.partial(_host_walk, walk={k: rw[k] for k in ('alpha', 'beta', 'logt')},
                               radius=config.aff.radius, dataset=dataset)
  else:
    finish = functools.partial(_save_device_walk, dataset=dataset)
  workers = (int(rw.workers) or os.cpu_count()) if on_host else 1
  with pools.process_pool(workers) as pool:
    per_image.device_loop(loop, todo, load, finish, done, 2, pool, 2 * workers, max_pending=4 * loop.batch_size)
