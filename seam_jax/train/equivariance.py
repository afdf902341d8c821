"""The equivariant transforms SEAM constrains its CAMs with (SEAM_SPEC section 3): each has `image(x)`, applied to
the input batch to make the second view, and `cam(x)`, applied to the first view's CAMs so that both views' CAMs
can be compared. The original uses Rescale(0.3); flips and rotations give the general equivariance constraint.
(Not to be confused with the data augmentations of seam_jax.data.augment.)"""
import dataclasses

import jax.numpy as jnp

from seam_jax.common import ops


@dataclasses.dataclass(frozen=True)
class Rescale:
  """Bilinear rescale by `scale` with align_corners=True; output size floor(size * scale) (448 * 0.3 -> 134)."""
  scale: float = 0.3

  def image(self, x):
    return ops.resize_scale(x, self.scale, align_corners=True)

  def cam(self, x):
    return ops.resize_scale(x, self.scale, align_corners=True)


@dataclasses.dataclass(frozen=True)
class HFlip:
  """Horizontal flip (reverses the W axis)."""

  def image(self, x):
    return x[:, :, ::-1]

  def cam(self, x):
    return x[:, :, ::-1]


@dataclasses.dataclass(frozen=True)
class Rot90:
  """Rotation by k * 90 degrees in the (H, W) plane."""
  k: int = 1

  def image(self, x):
    return jnp.rot90(x, self.k, axes=(1, 2))

  def cam(self, x):
    return jnp.rot90(x, self.k, axes=(1, 2))


def make_equivariance(train_config):
  """The equivariant transform named by `config.train.equivariance` ('rescale' uses `config.train.scale_factor`)."""
  name = train_config.equivariance
  if name == 'rescale':
    return Rescale(float(train_config.scale_factor))
  if name == 'flip':
    return HFlip()
  if name == 'rot90':
    return Rot90(1)
  raise ValueError(f"config.train.equivariance: unknown transform {name!r} (expected 'rescale', 'flip' or 'rot90')")
