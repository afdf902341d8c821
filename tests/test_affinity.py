"""AffinityNet labels, loss and training task (SEAM_SPEC section 6)."""
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from seam_jax import affinity_labels as al
from seam_jax.models.affinity import effective_radius, pair_affinity, search_offsets
from tests import torch_reference


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
