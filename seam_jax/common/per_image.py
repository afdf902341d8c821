"""The one driver of the per-image stages (CAM inference, CRF, random walk, segmentation test, predict).

Every such stage does the same around its own per-image work: check the inputs of what is left to do over the whole
list (so every process fails with the same one-line DataError before any work), take this process's share
(distributed.process_share), keep the items whose outputs are not all present (all of them with `force`: outputs
are written atomically, so a killed run resumes with exactly the missing ones), run the work with a progress bar,
meet the other processes at a barrier, and report uniform stats. `run` is that loop; `device_loop` is the bucketed
device loop with host threads that the network stages run inside it.
"""
import concurrent.futures
import os
import threading
import time

from absl import logging
from tqdm import tqdm

from seam_jax.common import bucketing, distributed, errors, pools


class _Done:
  """done(files=1): one item finished, having written `files` files (thread safe; drives the progress bar)."""

  def __init__(self, total, desc, show):
    self._lock = threading.Lock()
    self.images = self.files = 0
    self._bar = tqdm(total=total, desc=desc, unit='img', disable=not show)

  def __call__(self, files=1):
    with self._lock:
      self.images += 1
      self.files += int(files)
      self._bar.update(1)

  def close(self):
    self._bar.close()


def run(name, items, outputs, work, force=False, inputs=None, progress=True):
  """Run `work` over this process's items whose outputs are not all present (all with `force`), then meet the
  other processes at distributed.barrier(name). Every process passes the same whole list `items`.

  outputs(item) -> [paths] the item writes (an item without outputs has nothing to do);
  inputs(item) -> [paths] it reads, checked for every item to do of the whole list (DataError naming one missing);
  work(todo, done) -> None or a dict of extra stats: does the items of `todo` (this process's), calling done(files)
    once per finished item with the number of files it wrote (from any thread);
  progress: a tqdm bar of the done() calls (False when `work` draws its own).
  Returns this process's {'images': done now, 'skipped': already done, 'files_written', 'seconds', 'img_per_s',
  and work's extra stats}.
  """
  items = list(items)

  def pending(item):
    outs = outputs(item)
    return bool(outs) and (force or not all(os.path.isfile(p) for p in outs))

  if inputs is None:
    share = [(it, pending(it)) for it in distributed.process_share(items)]
  else:
    flagged = [(it, pending(it)) for it in items]
    missing = [p for it, todo in flagged if todo for p in inputs(it) if not os.path.isfile(p)]
    if missing:
      raise errors.DataError(f'{name}: {len(missing)} input files missing, e.g. {missing[0]}')
    share = distributed.process_share(flagged)
  todo = [it for it, p in share if p]
  stats = {'images': len(todo), 'skipped': len(share) - len(todo), 'files_written': 0, 'seconds': 0.,
           'img_per_s': 0.}
  if todo:
    t0 = time.time()
    done = _Done(len(todo), name, progress)
    try:
      extra = work(todo, done) or {}
    finally:
      done.close()
    if done.images != len(todo):
      raise RuntimeError(f'{name}: the work reported {done.images} of its {len(todo)} images done')
    dt = max(time.time() - t0, 1e-9)
    stats.update(files_written=done.files, seconds=dt, img_per_s=len(todo) / dt, **extra)
  logging.info('%s: %d images done in %.1f s (%.2f img/s, %d files written), %d already done; this process has '
               '%d of the %d in the list%s', name, stats['images'], stats['seconds'], stats['img_per_s'],
               stats['files_written'], stats['skipped'], len(share), len(items), '' if force else ' (force redoes all)')
  distributed.barrier(name)
  return stats


def device_loop(loop, todo, load, finish, done, threads=2, finisher=None, finish_depth=None, max_pending=16):
  """The items of `todo` through a bucketed device loop: load(item) -> (key, payload, [bucketing.Piece]) on
  `threads` host threads (2 * threads ahead); their pieces batched across items by bucketing.schedule (at most
  `max_pending` items waiting); finish((key, payload, [(output, meta)])) -> files written, on `finisher` (an
  executor: threads or a process pool; None: inline), `finish_depth` (default 2 * threads) ahead; done(files) per
  finished item."""
  with concurrent.futures.ThreadPoolExecutor(threads) as prep:
    results = bucketing.schedule(loop, pools.prefetch(load, todo, prep, 2 * threads), max_pending)
    for files in pools.prefetch(finish, results, finisher, finish_depth or 2 * threads):
      done(files)
