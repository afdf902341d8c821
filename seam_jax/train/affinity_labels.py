"""AffinityNet training labels and loss (SEAM_SPEC section 6).

The labels come from two CRF'd score maps of each image: `la` (background power 4: confident foreground) and `ha`
(power 24: confident background). After the joint crop/flip they are block-mean pooled 8x8 to the feature size,
turned into a label map (fg class / 0 background / 255 unsure), and every (from, to) pixel pair within the radius
becomes a positive-background, positive-foreground or negative pair (or none). Host side: pure NumPy. The loss is
pure JAX.
"""
import jax.numpy as jnp
import numpy as np

from seam_jax.common.bucketing import STRIDE
from seam_jax.data.voc import IGNORE
from seam_jax.infer import score_dicts
from seam_jax.models.affinity import effective_radius, shifted_pairs

EPS = 1e-5


def score_stack(scores, path='scores'):
  """A CRF score dict {0: bg, c+1: fg probs} (HxW each; checked by seam_jax.infer.score_dicts) -> (H, W, K)
  float32, channels in key order (0 = background)."""
  score_dicts.validate(scores, path, kind=score_dicts.SCORES)
  return np.stack([np.asarray(scores[k], np.float32) for k in sorted(scores)], axis=-1)


def block_mean(x, k=STRIDE):
  """(H, W, C) -> (ceil(H/k), ceil(W/k), C) means of k x k blocks; a partial block is zero-padded first (the
  original's skimage `block_reduce(x, (k, k, 1), np.mean)`)."""
  h, w, c = x.shape
  ph, pw = -h % k, -w % k
  if ph or pw:
    x = np.pad(x, ((0, ph), (0, pw), (0, 0)))
  return x.reshape((h + ph) // k, k, (w + pw) // k, k, c).mean(axis=(1, 3), dtype=np.float32)


def label_map(la, ha):
  """Pooled (h, w, K) la / ha scores -> uint8 (h, w) labels, in the original's order:
  label = argmax la; label[argmax la == 0] = 255; label[argmax ha == 0] = 0; label[max of all scores < 1e-5] = 255.
  Labels are positions in the score stack: only their equality (and 0 = background, 255 = unsure) matters."""
  none = np.maximum(la.max(-1), ha.max(-1)) < EPS
  la_arg = np.argmax(la, axis=-1).astype(np.uint8)
  label = la_arg.copy()
  label[la_arg == 0] = IGNORE
  label[np.argmax(ha, axis=-1) == 0] = 0
  label[none] = IGNORE
  return label


def pair_labels(label, radius):
  """Label map (h, w) -> bool (bg_pos, fg_pos, neg), each (P, hf, wf) in pair_affinity's layout.

  pos = l_from == l_to; valid = both < 255; bg_pos = pos & l_from == 0; fg_pos = pos & l_from != 0 & valid;
  neg = !pos & valid."""
  pairs = list(shifted_pairs(np.asarray(label)[None, :, :, None], radius))
  l_from = pairs[0][0][0, ..., 0][None]
  l_to = np.stack([t[0, ..., 0] for _, t in pairs])
  pos = l_from == l_to
  valid = (l_from < IGNORE) & (l_to < IGNORE)
  return pos & (l_from == 0), pos & (l_from != 0) & valid, ~pos & valid


def affinity_labels(la, ha, radius):
  """Cropped (H, W, K) la and ha score maps -> uint8 (3, P, hf, wf) stack of (bg_pos, fg_pos, neg) on the
  stride-8 grid, with the radius shrunk on small maps as the network does (effective_radius)."""
  if la.shape != ha.shape:
    raise ValueError(f'la and ha score maps differ in shape: {la.shape} vs {ha.shape}')
  label = label_map(block_mean(la), block_mean(ha))
  r = effective_radius(*label.shape, radius)
  if r < 2:
    raise ValueError(f'a {la.shape[0]}x{la.shape[1]} crop gives a {label.shape} grid: too small for any pair')
  return np.stack(pair_labels(label, r)).astype(np.uint8)


def affinity_loss(aff, labels):
  """AffinityNet loss over the whole batch. aff (N, P, hf, wf) in (0, 1]; labels (N, 3, P, hf, wf) 0/1 masks
  (bg_pos, fg_pos, neg). With sums over every pair of every image:
    bg  = sum(-bg_pos * log(aff + 1e-5)) / (sum(bg_pos) + 1e-5),   fg likewise with fg_pos,
    neg = sum(-neg * log(1 + 1e-5 - aff)) / (sum(neg) + 1e-5),
    loss = bg / 4 + fg / 4 + neg / 2.
  Returns (loss, metrics with the three terms and the pair counts)."""
  aff = aff.astype(jnp.float32)
  bg_pos, fg_pos, neg = (labels[:, i].astype(jnp.float32) for i in range(3))
  cnt = {k: jnp.sum(m) + EPS for k, m in (('bg', bg_pos), ('fg', fg_pos), ('neg', neg))}
  log_pos = -jnp.log(aff + EPS)
  bg = jnp.sum(bg_pos * log_pos) / cnt['bg']
  fg = jnp.sum(fg_pos * log_pos) / cnt['fg']
  ng = jnp.sum(-neg * jnp.log(1. + EPS - aff)) / cnt['neg']
  loss = bg / 4 + fg / 4 + ng / 2
  return loss, {'bg_loss': bg, 'fg_loss': fg, 'neg_loss': ng,
                'bg_cnt': cnt['bg'], 'fg_cnt': cnt['fg'], 'neg_cnt': cnt['neg']}
