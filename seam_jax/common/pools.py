"""Host-side parallelism shared by the stages: spawn process pools (never fork a parent that may hold JAX threads)
with ordered results and progress bars, and bounded thread prefetching."""
import collections
import concurrent.futures
import contextlib
import multiprocessing
import os

from tqdm import tqdm


def num_workers(workers, items=None):
  """`workers` (0 = all cores), capped at the number of items when given."""
  n = int(workers) or os.cpu_count() or 1
  return max(1, min(n, len(items))) if items is not None else n


@contextlib.contextmanager
def process_pool(workers):
  """A spawn ProcessPoolExecutor of `workers` processes, or None for workers <= 1 (run in-process)."""
  if workers <= 1:
    yield None
    return
  with concurrent.futures.ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context('spawn')) as ex:
    yield ex


def pool_imap(fn, items, workers=0, chunksize=None, desc=None):
  """Ordered results of fn over items in a spawn process pool (workers 0 = all cores, 1 = in-process), with a
  progress bar when `desc` is given. fn must be picklable (a module-level function or a picklable partial)."""
  items = list(items)
  workers = num_workers(workers, items)
  if chunksize is None:
    chunksize = max(1, min(64, len(items) // (4 * workers)))
  with process_pool(workers) as ex:
    results = ex.map(fn, items, chunksize=chunksize) if ex else map(fn, items)
    yield from tqdm(results, total=len(items), desc=desc, leave=False, disable=desc is None)


def prefetch(fn, items, executor, depth):
  """fn over items in `executor` (threads or processes; None: inline), results in order, at most `depth` ahead."""
  q = collections.deque()
  for it in items:
    q.append(executor.submit(fn, it) if executor else done_future(fn(it)))
    if len(q) > depth:
      yield q.popleft().result()
  while q:
    yield q.popleft().result()


def done_future(value):
  """A completed Future holding `value` (for code paths that run inline instead of in a pool)."""
  f = concurrent.futures.Future()
  f.set_result(value)
  return f
