"""The one error type for bad input: every stage raises it with a message naming the file or key, and the entry
points print it as a single line (seam_jax.common.cli) instead of a traceback. Also the classification of the
other user-side failure the entry points report in one line: a write the file system refuses."""
import errno
import os
import re

# Read-only or full file system, permission denied, quota, a file where a folder should be (ENOTDIR: below it,
# EEXIST: creating the folder itself).
WRITE_ERRNOS = frozenset({errno.EROFS, errno.ENOSPC, errno.EACCES, errno.EPERM, errno.EDQUOT, errno.ENOTDIR,
                          errno.EEXIST})
_TENSORSTORE_OS_ERROR = re.compile(r"\[os_error_code='(\d+)'\]")   # how tensorstore (orbax's writer) reports one


def _without_spec(text):
  return text.split(' [tensorstore_spec=')[0]   # tensorstore appends its whole JSON spec to its messages


class DataError(Exception):
  """Bad input data or settings; the message names the offending file or key."""


def describe(e, limit=200):
  """'Type: message' of an exception on one line, cut at `limit` characters."""
  text = ' '.join(_without_spec(str(e)).split())
  return f'{type(e).__name__}: {text[:limit]}{"..." if len(text) > limit else ""}'


def write_failure(e):
  """'cannot write <file>: <reason>' when `e`, or an exception it was raised from, is a write the file system
  refused (WRITE_ERRNOS; also tensorstore's ValueError carrying such an OS error code), else None."""
  seen = set()
  while e is not None and id(e) not in seen:
    seen.add(id(e))
    if isinstance(e, OSError) and e.errno in WRITE_ERRNOS:
      hint = ' (a file stands where a folder is needed)' if e.errno in (errno.ENOTDIR, errno.EEXIST) else ''
      return f'cannot write {e.filename or "a file"}: {e.strerror}{hint}'
    code = _TENSORSTORE_OS_ERROR.search(str(e)) if isinstance(e, ValueError) else None
    if code and int(code[1]) in WRITE_ERRNOS:
      paths = re.findall(r'"(/[^"]*)"', _without_spec(str(e)))
      return f'cannot write {paths[-1] if paths else "a checkpoint file"}: {os.strerror(int(code[1]))}'
    e = e.__cause__ or e.__context__
  return None
