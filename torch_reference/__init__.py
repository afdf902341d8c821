"""PyTorch reference of the original SEAM networks and losses, for parity tests and baseline benchmarks only:
the seam_jax library never imports it (or torch)."""
