"""seam_jax: SEAM (CVPR 2020) weakly supervised semantic segmentation in JAX/Flax."""
__version__ = '0.1.0'
