"""Training checkpoints: orbax steps of {'state', 'rng'}, the grain iterator state, the run's identity (meta) and the
host metrics of the steps since the last log line (log), so that a resumed run logs what an uninterrupted one does.

orbax writes a step under a temporary name and renames it when complete, so a kill during a write leaves no step
(the leftover temporary folder is removed at the next start). A step damaged afterwards (a file truncated or
deleted) fails to restore: when an older step restores, the damaged newer ones are moved to `<ckpt>_damaged/`
with a warning and training resumes from the older one; when none restores (damage everywhere, or checkpoints of
an incompatible configuration) it is a DataError and nothing is moved. A checkpoint of another task, model kind or
width is a DataError naming the folder. Every process of a multi-host run reads the same steps and agrees on the
outcome; only process 0 moves folders.
"""
import os

from absl import logging
import grain
import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

from seam_jax.common import distributed
from seam_jax.common.errors import DataError


def manager(directory, keep):
  options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True, cleanup_tmp_directories=True)
  return ocp.CheckpointManager(os.path.abspath(directory), options=options,
                               item_names=('state', 'data', 'meta', 'log'))


def save(mngr, step, state, rng, data_iter, meta, unlogged=()):
  """Asynchronous save of step `step` (every process calls it; orbax writes each array once). `unlogged`: the host
  metric dicts of the steps after the last log line, restored by restore_latest."""
  _align_operation_ids()
  mngr.save(step, args=ocp.args.Composite(
      state=ocp.args.StandardSave({'state': state, 'rng': rng}),
      data=grain.checkpoint.CheckpointSave(data_iter),
      meta=ocp.args.JsonSave(meta),
      log=ocp.args.JsonSave({'unlogged': [{k: float(v) for k, v in m.items()} for m in unlogged]})))


def _align_operation_ids():
  """Move this process's orbax save counter to the largest of all processes.

  orbax numbers the saves of each process (OperationIdGenerator, a per-process counter), and in a multi-process
  save every process waits for the primary's "folder created" signals stored under that number in the coordination
  service. A save by one process alone (the export, written by process 0 after each training task) advances its
  counter only: at the next task's first checkpoint, process 1 then found the signals of that export under its
  number, did not wait, and wrote its grain state into a folder not yet created (FileNotFoundError:
  .../data.orbax-checkpoint-tmp/process_1-of-2.json) while process 0 waited for it. After the move, the next save
  has one number in every process, never used before by any of them."""
  if distributed.process_count() == 1:
    return
  from orbax.checkpoint._src.futures import synchronization  # pylint: disable=g-import-not-at-top  (no public API)
  ids = synchronization.OperationIdGenerator
  target = max(int(i) for i in distributed.all_gather(np.int64(ids.get_current_operation_id()), 'orbax op id'))
  while int(ids.get_current_operation_id()) < target:
    ids.next_operation_id()


@jax.jit
def all_finite(tree):
  """True when no floating leaf of `tree` holds a NaN or an infinity (one pass over the state; run before saves)."""
  leaves = [jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree) if jnp.issubdtype(x.dtype, jnp.floating)]
  return jnp.all(jnp.stack(leaves)) if leaves else jnp.array(True)


def _everywhere(ok, name):
  """`ok` of this process AND every other process's (the same answer in all of them)."""
  return int(distributed.sum_over_processes(np.int64(not ok), name)) == 0


def _try_restore(mngr, step, args):
  try:
    return mngr.restore(step, args=args), None
  except Exception as e:  # noqa: BLE001 - orbax / tensorstore / json raise many types for one damaged file
    return None, e


def _describe(e):
  return f'{type(e).__name__}: {" ".join(str(e).split())[:200]}'


def _set_aside(mngr, damaged, resumed):
  """Move the damaged steps out of the manager's folder (process 0), warn, and let every process re-list."""
  target = f'{os.fspath(mngr.directory).rstrip(os.sep)}_damaged'
  for step, error in damaged:
    dst = os.path.join(target, str(step))
    if distributed.is_main():
      os.makedirs(target, exist_ok=True)
      k = 1
      while os.path.exists(dst):
        dst, k = os.path.join(target, f'{step}.{k}'), k + 1
      os.replace(os.path.join(mngr.directory, str(step)), dst)
    logging.warning('checkpoint step %d in %s cannot be read (%s): moved to %s; resuming from step %d', step,
                    mngr.directory, _describe(error), target, resumed)
  distributed.barrier('checkpoints set aside')
  mngr.reload()


def restore_latest(mngr, abstract, data_iter, meta):
  """(state, rng, unlogged metric dicts) of the newest readable step, the state as `abstract` (ShapeDtypeStructs
  with shardings), `data_iter` restored in place; None when the folder holds no step. See the module docstring for
  damaged steps."""
  damaged = []
  for step in sorted(mngr.all_steps(), reverse=True):
    out, error = _try_restore(mngr, step, ocp.args.Composite(meta=ocp.args.JsonRestore()))
    if out is not None and out['meta'] != meta:
      raise DataError(f'{mngr.directory} holds a checkpoint of {out["meta"]}, but this run trains {meta}: use '
                      'another workdir or delete that folder')
    if error is None:
      items = dict(state=ocp.args.StandardRestore(abstract), data=grain.checkpoint.CheckpointRestore(data_iter))
      if os.path.isdir(os.path.join(mngr.directory, str(step), 'log')):   # absent in checkpoints of older versions
        items['log'] = ocp.args.JsonRestore()
      out, error = _try_restore(mngr, step, ocp.args.Composite(**items))
    if _everywhere(error is None, f'restore {step}'):
      if damaged:
        _set_aside(mngr, damaged, step)
      return out['state']['state'], out['state']['rng'], out['log']['unlogged'] if 'log' in items else []
    damaged.append((step, error or RuntimeError('another process could not read it')))
  if damaged:
    raise DataError(f'no checkpoint in {mngr.directory} can be restored (newest: step {damaged[0][0]}, '
                    f'{_describe(damaged[0][1])}): if the configuration changed use another workdir, else move '
                    'the damaged steps away')
  return None
