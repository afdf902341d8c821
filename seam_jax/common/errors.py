"""The one error type for bad input: every stage raises it with a message naming the file or key, and the entry
points print it as a single line (seam_jax.common.cli) instead of a traceback."""


class DataError(Exception):
  """Bad input data or settings; the message names the offending file or key."""
