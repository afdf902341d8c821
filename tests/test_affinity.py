"""AffinityNet labels, loss and training task (SEAM_SPEC section 6)."""
import math
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image
import pytest
import torch
import torch.nn.functional as F

from configs import demo
from seam_jax.train import affinity_labels as al
from seam_jax import layout
from seam_jax.train import affinity_task as at
from seam_jax import models
from seam_jax.data import voc
from seam_jax.models.affinity import effective_radius, pair_affinity, search_offsets
from torch_reference import models as torch_reference
from tests.test_random_walk import random_variables
from seam_jax.common import errors, files


# ------------------------------------------------------------------------------------------- hand-computed cases
def test_block_mean_pads_partial_blocks_with_zeros():
  x = np.arange(2 * 3 * 1, dtype=np.float32).reshape(2, 3, 1)        # [[0 1 2] [3 4 5]]
  np.testing.assert_allclose(al.block_mean(x, 2)[..., 0], [[(0 + 1 + 3 + 4) / 4, (2 + 5) / 4]])
  y = np.random.default_rng(0).random((16, 24, 3)).astype(np.float32)
  np.testing.assert_allclose(al.block_mean(y, 8)[1, 2], y[8:16, 16:24].mean((0, 1)), rtol=1e-6)


def test_label_map_rules_in_order():
  # Five pixels (K = 3 channels: bg, fg a, fg b) covering every rule of the spec.
  la = np.array([[[.1, .8, .1], [.7, .2, .1], [.1, .1, .8], [0, 0, 0], [.9, .05, .05]]], np.float32)
  ha = np.array([[[.1, .8, .1], [.1, .6, .3], [.9, .1, .0], [0, 0, 0], [.9, .05, .05]]], np.float32)
  # fg a sure -> 1; la says bg, ha fg -> unsure 255; ha says bg -> 0; no score anywhere -> 255; both bg -> 0.
  np.testing.assert_array_equal(al.label_map(la, ha), [[1, 255, 0, 255, 0]])


@pytest.mark.parametrize('la, ha, expected', [
    ([0, 2e-5], [0, 0], 0),          # la fg, ha bg -> 0; the max over ALL channels (2e-5) is a score
    ([0, 5e-6], [0, 0], 255),        # every score < 1e-5 -> none -> 255 overrides the 0
    ([0, 0], [2e-5, 0], 0),          # only ha has a score: still not "none"
    ([0, 0], [5e-6, 0], 255),
])
def test_label_map_none_rule_uses_both_stacks(la, ha, expected):
  assert al.label_map(np.array([[la]], np.float32), np.array([[ha]], np.float32))[0, 0] == expected


@pytest.mark.parametrize('label, expected', [
    # from pixel (0, 1); to pixels (0,2), (1,0), (1,1), (1,2) for radius 2; codes: b bg_pos, f fg_pos, n neg, - none
    ([[0, 0, 255], [3, 0, 3]], '-nbn'),
    ([[1, 5, 5], [255, 5, 0]], 'f-fn'),
    ([[0, 255, 255], [0, 255, 3]], '----'),
])
def test_pair_labels_hand_cases(label, expected):
  assert search_offsets(2) == [(0, 1), (1, -1), (1, 0), (1, 1)]
  bg, fg, neg = al.pair_labels(np.array(label, np.uint8), 2)
  assert bg.shape == (4, 1, 1)
  got = ''.join('b' if b else 'f' if f else 'n' if n else '-' for b, f, n in zip(bg.ravel(), fg.ravel(), neg.ravel()))
  assert got == expected


def test_loss_hand_case():
  aff = jnp.array([[[[0.5, 0.25, 0.9]]]])                              # (N=1, P=1, 1, 3)
  labels = jnp.array([[[[[1, 0, 0]]], [[[0, 0, 1]]], [[[0, 1, 0]]]]], jnp.uint8)   # bg_pos, fg_pos, neg
  loss, m = al.affinity_loss(aff, labels)
  bg = -math.log(0.5 + 1e-5) / (1 + 1e-5)
  fg = -math.log(0.9 + 1e-5) / (1 + 1e-5)
  neg = -math.log(1 + 1e-5 - 0.25) / (1 + 1e-5)
  np.testing.assert_allclose([m['bg_loss'], m['fg_loss'], m['neg_loss']], [bg, fg, neg], rtol=1e-6)
  np.testing.assert_allclose(loss, bg / 4 + fg / 4 + neg / 2, rtol=1e-6)
  empty = al.affinity_loss(aff, jnp.zeros_like(labels))[0]              # no pairs: 0, not NaN
  assert float(empty) == 0.


def test_loss_sums_over_the_whole_batch():
  rng = np.random.default_rng(1)
  aff = jnp.asarray(rng.uniform(0.01, 0.99, (2, 3, 2, 2)), jnp.float32)
  labels = rng.integers(0, 2, (2, 3, 3, 2, 2)).astype(np.float32)
  loss = al.affinity_loss(aff, jnp.asarray(labels, jnp.uint8))[0]
  per_image_mean = np.mean([al.affinity_loss(aff[i:i + 1], labels[i:i + 1])[0] for i in range(2)])
  bg = np.sum(-labels[:, 0] * np.log(aff + 1e-5)) / (labels[:, 0].sum() + 1e-5)
  fg = np.sum(-labels[:, 1] * np.log(aff + 1e-5)) / (labels[:, 1].sum() + 1e-5)
  neg = np.sum(-labels[:, 2] * np.log(1 + 1e-5 - aff)) / (labels[:, 2].sum() + 1e-5)
  np.testing.assert_allclose(loss, bg / 4 + fg / 4 + neg / 2, rtol=1e-5)
  assert abs(float(loss) - per_image_mean) > 1e-4      # not a mean of per-image losses


# --------------------------------------------------------------------- torch re-implementation of the original
def torch_labels(scores, crop, radius):
  """The original's label path in torch, written from the spec: (H, W, 2K) cropped la|ha scores -> pair labels
  (P, hf*wf) bg_pos, fg_pos, neg as float32, via avg_pool2d and index_select on flat pixel indices."""
  t = torch.from_numpy(scores).permute(2, 0, 1)[None]
  t = F.avg_pool2d(t, 8, 8)[0].permute(1, 2, 0)                   # (h, w, 2K)
  none = torch.amax(t, -1) < 1e-5
  la, ha = torch.chunk(t, 2, dim=-1)
  la, ha = torch.argmax(la, -1), torch.argmax(ha, -1)
  lab = la.clone()
  lab[la == 0] = 255
  lab[ha == 0] = 0
  lab[none] = 255
  h, w = lab.shape
  r = radius if min(h, w) >= 2 * radius + 1 else (min(h, w) - 1) // 2
  i_from, i_to = torch_reference.pair_indices(h, w, r)
  flat = lab.reshape(-1)
  lf = flat[i_from][None]                                          # (1, hf*wf)
  lt = flat[i_to].view(-1, lf.shape[1])                            # (P, hf*wf)
  pos = lf == lt
  valid = (lf < 255) & (lt < 255)
  return [m.float() for m in (pos & (lf == 0), pos & (lf != 0) & valid, ~pos & valid)]


def torch_loss(aff, bg, fg, neg):
  cnt = [m.sum() + 1e-5 for m in (bg, fg, neg)]
  lb = torch.sum(-bg * torch.log(aff + 1e-5)) / cnt[0]
  lf = torch.sum(-fg * torch.log(aff + 1e-5)) / cnt[1]
  ln = torch.sum(-neg * torch.log(1. + 1e-5 - aff)) / cnt[2]
  return lb / 4 + lf / 4 + ln / 2


def crf_like_scores(rng, h, w, k, crop):
  """Random la/ha score stacks (K channels each, bg first) with blobs of confident classes, placed in a zero
  container like a crop of a smaller image (so the "none" rule is exercised)."""
  def stack(power):
    blocks = rng.random((k - 1, h // 8, w // 8)) * (rng.random((1, h // 8, w // 8)) < 0.6)   # some bg blocks
    fg = blocks.repeat(8, 1).repeat(8, 2) * rng.random((k - 1, h, w)) ** 0.2
    return np.concatenate([(1 - fg.max(0, keepdims=True)) ** power, fg]).transpose(1, 2, 0)
  la, ha = stack(4), stack(24)
  cont = np.zeros((crop, crop, 2 * k), np.float32)
  cont[:h, crop - w:] = np.concatenate([la, ha], -1)
  return cont


@pytest.mark.parametrize('crop, h, w, k', [(96, 80, 64, 3), (64, 64, 40, 4), (48, 48, 48, 2)])
def test_labels_and_loss_match_torch_reference(crop, h, w, k):
  rng = np.random.default_rng(crop + k)
  scores = crf_like_scores(rng, h, w, k, crop)
  la, ha = scores[..., :k], scores[..., k:]
  ours = al.affinity_labels(la, ha, 5)
  ref = torch_labels(scores, crop, 5)
  hf_wf = ours.shape[2:]
  assert ours.shape[:2] == (3, len(search_offsets(effective_radius(crop // 8, crop // 8, 5))))
  for i in range(3):
    np.testing.assert_array_equal(ours[i].reshape(ours.shape[1], -1), ref[i].numpy())
  assert all(ours[i].sum() > 0 for i in range(3))               # every kind of pair present: a real test
  aff = rng.uniform(0.001, 0.999, (2,) + ours.shape[1:]).astype(np.float32)
  labels = np.stack([ours, al.affinity_labels(ha, la, 5)])      # a second, different image
  loss = al.affinity_loss(jnp.asarray(aff), jnp.asarray(labels))[0]
  ref_masks = [torch.stack([torch_labels(scores, crop, 5)[i],
                            torch_labels(np.concatenate([ha, la], -1), crop, 5)[i]]) for i in range(3)]
  ref_loss = torch_loss(torch.from_numpy(aff).reshape(2, ours.shape[1], -1), *ref_masks)
  np.testing.assert_allclose(loss, ref_loss.numpy(), rtol=1e-5)
  assert hf_wf == (crop // 8 - effective_radius(crop // 8, crop // 8, 5) + 1,
                   crop // 8 - 2 * (effective_radius(crop // 8, crop // 8, 5) - 1))


def test_loss_is_jittable_and_differentiable_through_pair_affinity():
  rng = np.random.default_rng(3)
  x = jnp.asarray(rng.normal(size=(2, 12, 12, 8)), jnp.float32)
  labels = jnp.asarray(rng.integers(0, 2, (2, 3, 34, 8, 4)), jnp.uint8)
  f = jax.jit(jax.value_and_grad(lambda x: al.affinity_loss(pair_affinity(x, 5), labels)[0]))
  loss, g = f(x)
  assert np.isfinite(loss) and np.all(np.isfinite(g)) and np.abs(g).sum() > 0


# ------------------------------------------------------------------------------------------ training data + task
def write_demo_record(root, image_id, h, w, classes, rng):
  """A position-coded image (R = column, G = row, B = 200) and la/ha CRF dicts with random blocky scores."""
  rows, cols = np.mgrid[:h, :w]
  img = np.stack([cols, rows, np.full_like(rows, 200)], -1).astype(np.uint8)
  os.makedirs(root / 'VOC2012' / 'JPEGImages', exist_ok=True)
  Image.fromarray(img).save(root / 'VOC2012' / 'JPEGImages' / f'{image_id}.jpg', format='PNG')  # lossless code
  for name, power in (('crf_4.0', 4), ('crf_24.0', 24)):
    fg = {c: np.kron(rng.random((h // 4 + 1, w // 4 + 1)) * (rng.random((h // 4 + 1, w // 4 + 1)) < .5),
                     np.ones((4, 4)))[:h, :w].astype(np.float32) for c in classes}
    bg = (1 - np.max(list(fg.values()), 0)) ** power
    files.save_npy_dict(str(root / name / f'{image_id}.npy'), {0: bg, **{c + 1: v for c, v in fg.items()}})


@pytest.fixture(scope='module')
def aff_config(tmp_path_factory):
  root = tmp_path_factory.mktemp('aff')
  rng = np.random.default_rng(0)
  sizes = {'x1': (40, 52), 'x2': (60, 30), 'x3': (56, 56), 'x4': (33, 47)}
  for i, (h, w) in sizes.items():
    write_demo_record(root, i, h, w, [4, 11] if i != 'x3' else [2], rng)
  cfg = demo.get_config()
  cfg.workdir = str(root / 'work')
  cfg.data.voc_root = str(root / 'VOC2012')
  cfg.data.list_dir = str(root / 'lists')
  cfg.infer.crf_dir = str(root / 'crf')
  cfg.infer.crf_alphas = (4.0, 24.0)   # the original's la / ha (the demo recipe's are 1 and 4)
  cfg.aff.crop_size = 48
  cfg.aff.batch_size = 2
  cfg.model.width_div = 32
  voc.write_list(str(root / 'lists' / 'train.txt'), list(sizes))
  return cfg


def decode_and_expect(out, record, normalize_before_crop, radius):
  """From the position-coded output image find where every container pixel came from, rebuild the expected
  cropped+flipped la/ha scores by indexing, and their labels."""
  img = out['image']
  if normalize_before_crop:
    pad = np.all(img == 0, -1)
  else:
    pad = np.all(np.abs(img - voc.normalize(np.zeros((1, 1, 3), np.uint8))) < 1e-5, -1)
  px = np.rint((img * voc.STD + voc.MEAN) * 255).astype(int)
  assert np.all(px[~pad][:, 2] == 200)                             # every non-padding pixel is image content
  k = record['la'].shape[-1]
  scores = np.concatenate([record['la'], record['ha']], -1)
  exp = np.where(pad[..., None], 0., scores[np.where(pad, 0, px[..., 1]), np.where(pad, 0, px[..., 0])])
  cols = np.where(pad, -1, px[..., 0])
  return affinity_labels_of(exp, k, radius), cols


def affinity_labels_of(scores, k, radius):
  return al.affinity_labels(scores[..., :k].astype(np.float32), scores[..., k:].astype(np.float32), radius)


@pytest.mark.parametrize('normalize_before_crop', [False, True])
def test_transform_crops_and_flips_image_and_scores_jointly(aff_config, normalize_before_crop):
  cfg = aff_config.copy_and_resolve_references()
  cfg.aff.normalize_before_crop = normalize_before_crop
  cfg.data.jitter = (0., 0., 0., 0.)                                # keep the position code intact
  source = at.AffinitySource(cfg.data.voc_root, ['x1', 'x2', 'x3', 'x4'], *layout.score_dirs(cfg))
  transform = at.AffinityAugment.from_config(cfg)
  flips = set()
  for seed in range(6):
    for index in range(4):
      record = source[index]
      out = transform(record, np.random.default_rng(seed))
      assert out['image'].shape == (48, 48, 3) and out['image'].dtype == np.float32
      assert out['aff_labels'].shape == (3, 4, 5, 4) and out['aff_labels'].dtype == np.uint8  # 6x6 grid: radius 2
      expected, cols = decode_and_expect(out, record, normalize_before_crop, 5)
      np.testing.assert_array_equal(out['aff_labels'], expected)
      row = cols[np.argmax((cols >= 0).sum(1))]
      row = row[row >= 0]
      flips.add(bool(row[0] > row[-1]))
  assert flips == {True, False}


def test_transform_jitters_colours(aff_config):
  source = at.AffinitySource(aff_config.data.voc_root, ['x3'], *layout.score_dirs(aff_config))
  plain = at.AffinityAugment(48, (0., 0., 0., 0.), 5)(source[0], np.random.default_rng(1))
  jittered = at.AffinityAugment(48, (.3, .3, .3, .1), 5)(source[0], np.random.default_rng(1))
  assert np.abs(plain['image'] - jittered['image']).mean() > 0.01


def test_missing_or_mismatched_crf_files_are_data_errors(aff_config, tmp_path):
  la_dir, ha_dir = layout.score_dirs(aff_config)
  other = tmp_path / 'ha'
  shutil.copytree(ha_dir, other)
  os.remove(other / 'x2.npy')
  d = files.load_npy_dict(str(other / 'x1.npy'))
  files.save_npy_dict(str(other / 'x1.npy'), {0: d[0], 5: d[5]})
  source = at.AffinitySource(aff_config.data.voc_root, ['x1', 'x2', 'x3'], la_dir, str(other))
  with pytest.raises(errors.DataError, match='x2.npy'):
    source[1]
  with pytest.raises(errors.DataError, match='different classes'):
    source[0]
  skipping = at.AffinitySource(aff_config.data.voc_root, ['x1', 'x2', 'x3'], la_dir, str(other), on_error='skip')
  assert skipping[1] is None and skipping[2]['la'].shape == (56, 56, 2) and skipping.skipped == 1


@pytest.mark.slow
def test_loader_and_loss_fn(aff_config):
  task = at.affinity_task(aff_config)
  assert (task.name, task.model_kind, task.hparams) == ('affinity', 'affinity', aff_config.aff)
  loader, n = task.make_loader(0)
  assert n == 4
  batch = next(iter(loader))
  b = {k: jnp.asarray(v) for k, v in batch.items() if k != 'id'}
  images = task.input_images(b)     # the config's device augmentation finishes the image in the step
  assert images.shape == (2, 48, 48, 3) and batch['aff_labels'].shape == (2, 3, 4, 5, 4)
  model = models.build('affinity', aff_config.model)
  variables = random_variables(model)
  fn = jax.jit(lambda v, b, r: jax.value_and_grad(lambda p: task.loss_fn(
      model, {'params': p, 'batch_stats': v['batch_stats']}, b, r, 0), has_aux=True)(v['params']))
  (loss, metrics), grads = fn(variables, b, jax.random.PRNGKey(0))
  feats = jax.jit(model.apply)(variables, images)
  ref = al.affinity_loss(pair_affinity(feats, 2), b['aff_labels'])[0]
  assert np.isfinite(loss) and abs(float(loss) - float(ref)) > 0       # dropout active in training mode
  eval_loss = at.make_loss_fn(5, train=False, input_images=task.input_images)(
      model, variables, b, jax.random.PRNGKey(0), 0)[0]
  np.testing.assert_allclose(eval_loss, ref, rtol=1e-5)
  assert float(jnp.abs(grads['f9']['kernel']).sum()) > 0
  assert set(metrics) >= {'bg_loss', 'fg_loss', 'neg_loss', 'bg_cnt', 'fg_cnt', 'neg_cnt'}
