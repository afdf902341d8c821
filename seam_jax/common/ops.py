"""Array ops shared by the models, losses and inference (NHWC layout).

`jax.image.resize` uses half-pixel centres and anti-aliases when downsampling; PyTorch's
`F.interpolate(mode='bilinear', align_corners=True)` does neither. SEAM resizes with align_corners=True inside the
network and the losses, so we build that resize explicitly as two small interpolation matrices (exact, static
shapes, and matmul-friendly on accelerators).
"""
import functools

import jax
import jax.numpy as jnp
import numpy as np

HIGHEST = jax.lax.Precision.HIGHEST


@functools.lru_cache(maxsize=None)
def interp_matrix(n_in, n_out, align_corners):
  """(n_out, n_in) bilinear weights, PyTorch semantics for `align_corners` True/False (no antialias)."""
  m = np.zeros((n_out, n_in), np.float32)
  if align_corners:
    src = np.arange(n_out) * ((n_in - 1) / (n_out - 1)) if n_out > 1 else np.zeros(1)
  else:
    src = np.maximum((np.arange(n_out) + 0.5) * (n_in / n_out) - 0.5, 0.)
  i0 = np.minimum(np.floor(src).astype(np.int64), n_in - 1)
  i1 = np.minimum(i0 + 1, n_in - 1)
  w1 = (src - i0).astype(np.float32)
  np.add.at(m, (np.arange(n_out), i0), 1. - w1)
  np.add.at(m, (np.arange(n_out), i1), w1)
  return m


def resize_bilinear(x, size, align_corners=True):
  """Bilinear resize of NHWC `x` to `size` = (H, W), matching torch's F.interpolate for either corner mode."""
  h, w = size
  if (h, w) == tuple(x.shape[1:3]):
    return x
  mh = jnp.asarray(interp_matrix(x.shape[1], h, align_corners))
  mw = jnp.asarray(interp_matrix(x.shape[2], w, align_corners))
  y = jnp.einsum('oh,nhwc->nowc', mh, x.astype(jnp.float32), precision=HIGHEST)
  y = jnp.einsum('pw,nowc->nopc', mw, y, precision=HIGHEST)
  return y.astype(x.dtype)


def scaled_size(hw, scale):
  """Output size of torch's `F.interpolate(scale_factor=s)`: floor(in * s) per side (448 * 0.3 -> 134)."""
  return tuple(int(np.floor(d * scale)) for d in hw)


def resize_scale(x, scale, align_corners=True):
  return resize_bilinear(x, scaled_size(x.shape[1:3], scale), align_corners)


def max_norm(p, eps=1e-5):
  """Per (n, c) min-max normalisation over pixels of relu(p) (SEAM's `max_norm`), NHWC."""
  p = jax.nn.relu(p)
  mx = jnp.max(p, axis=(1, 2), keepdims=True)
  mn = jnp.min(p, axis=(1, 2), keepdims=True)
  return jax.nn.relu(p - mn - eps) / (mx - mn + eps)
