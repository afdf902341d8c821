"""AffinityNet (SEAM_SPEC section 6): ResNet38 + three 1x1 heads -> 448-ch stride-8 features, and the pairwise
affinities a = exp(-mean_c |x_from - x_to|) over a fixed set of offsets within a radius."""
import flax.linen as nn
import jax.numpy as jnp
import numpy as np

from seam_jax.models.resnet38 import BackboneNet
from seam_jax.models.seam import conv1x1, kaiming, xavier_gain4

NEW_LAYERS = ('f8_3', 'f8_4', 'f8_5', 'f9')


def search_offsets(radius):
  """The original's pair offsets (dy, dx): (0, 1..r-1), then dy = 1..r-1, dx = -(r-1)..r-1 with dx^2+dy^2 < r^2."""
  offs = [(0, dx) for dx in range(1, radius)]
  offs += [(dy, dx) for dy in range(1, radius) for dx in range(-radius + 1, radius) if dx * dx + dy * dy < radius ** 2]
  return offs


def effective_radius(h, w, radius):
  """The original shrinks the radius on small maps: min(h, w) < 2r + 1 -> r = (min - 1) // 2."""
  return radius if min(h, w) >= 2 * radius + 1 else (min(h, w) - 1) // 2


def from_window(h, w, radius):
  """(row slice, col slice) of the "from" pixels: rows 0..h-r, cols r-1..w-r."""
  return slice(0, h - radius + 1), slice(radius - 1, w - radius + 1)


def shifted_pairs(x, radius):
  """For an NHWC map, yield (x_from, x_to) for every offset; each is (N, hf, wf, C)."""
  h, w = x.shape[1:3]
  rs, cs = from_window(h, w, radius)
  x_from = x[:, rs, cs]
  for dy, dx in search_offsets(radius):
    yield x_from, x[:, rs.start + dy:rs.stop + dy, cs.start + dx:cs.stop + dx]


def pair_affinity(x, radius):
  """(N, P, hf, wf) affinities exp(-mean_c |x_from - x_to|), P = len(search_offsets(radius))."""
  return jnp.stack([jnp.exp(-jnp.mean(jnp.abs(a - b), axis=-1)) for a, b in shifted_pairs(x.astype(jnp.float32),
                                                                                            radius)], axis=1)


def pair_indices(h, w, radius):
  """Flat pixel indices of the pairs on an (h, w) map: from (hf*wf,), to (P, hf*wf), in pair_affinity's order."""
  idx = np.arange(h * w).reshape(1, h, w, 1)
  pairs = list(shifted_pairs(idx, radius))
  return pairs[0][0].reshape(-1), np.stack([t.reshape(-1) for _, t in pairs])


class AffinityNet(BackboneNet):
  """NHWC normalised image -> (N, h, w, 448/width_div) affinity features at stride 8."""

  @nn.compact
  def __call__(self, x, train=False):
    d = self.features(x, train)
    f = jnp.concatenate([nn.elu(conv1x1(self.ch(64), 'f8_3', kaiming, self.dtype)(d['conv4'])),
                         nn.elu(conv1x1(self.ch(128), 'f8_4', kaiming, self.dtype)(d['conv5'])),
                         nn.elu(conv1x1(self.ch(256), 'f8_5', kaiming, self.dtype)(d['conv6']))], axis=-1)
    return nn.elu(conv1x1(self.ch(448), 'f9', xavier_gain4, self.dtype)(f)).astype(jnp.float32)
