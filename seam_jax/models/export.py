"""Exported model weights: an orbax checkpoint of {'params', 'batch_stats'} plus `model.json` naming the model
(kind, width_div and, for the models with a class head, num_classes = K + 1).

seam_jax.models.convert.load_variables is the single entry for every weight source (export folders, .pth, .npz,
MXNet .params). Loading an export of another model (or another width, or another class count), or a damaged one
(model.json or weight files truncated or deleted), is a DataError naming the folder or file.
"""
import json
import os
import shutil

import jax
import numpy as np
import orbax.checkpoint as ocp

from seam_jax import models
from seam_jax.common.errors import DataError, describe
from seam_jax.data import voc

META = 'model.json'
CLASS_HEAD = {'seam': models.seam.CLASS_HEAD, 'deeplab': models.deeplab.CLASS_HEAD}   # kinds with a class head


def head_outputs(variables, kind):
  """The class head's outputs (K + 1) of `kind`'s variables; None for a model without a class head."""
  return int(variables['params'][CLASS_HEAD[kind]]['kernel'].shape[-1]) if kind in CLASS_HEAD else None


def head_mismatch(source, param, have, want):
  """The one-line error of weights whose class head `param` has `have` outputs loaded into a model of `want`."""
  return DataError(f'{source}: class head {param} has {have} outputs ({have - 1} classes + background) but the '
                   f'model being built has {want} ({want - 1} classes + background): weights of another class set; '
                   'reinit_head=True (convert --reinit_head) starts that head afresh')


def _this_process_only():
  """orbax options for the calling process alone: an export is written by one process and read by any subset (an
  inference process with no images to do loads nothing), so no cross-process barrier."""
  return ocp.options.MultiprocessingOptions(primary_host=jax.process_index(), active_processes={jax.process_index()})


def save_export(path, variables, kind, model_config):
  """Write `variables` as an export folder at `path`: built under `<path>.tmp`, then swapped in (an existing export
  stays intact until then); a failed write removes the temporary folder (or the next export does: orbax may still
  be writing into it)."""
  path = os.path.abspath(path)
  tmp, old = path + '.tmp', path + '.old'
  for leftover in (tmp, old):
    if os.path.exists(leftover):
      shutil.rmtree(leftover)
  host = jax.tree.map(lambda x: np.asarray(jax.device_get(x)), dict(variables))
  try:
    os.makedirs(tmp)
    with ocp.StandardCheckpointer(multiprocessing_options=_this_process_only()) as ckptr:  # no barrier
      ckptr.save(os.path.join(tmp, 'variables'), host)
      ckptr.wait_until_finished()
    with open(os.path.join(tmp, META), 'w') as f:
      meta = {'kind': kind, 'width_div': int(model_config.width_div)}
      if kind in CLASS_HEAD:
        meta['num_classes'] = head_outputs(host, kind)
      json.dump(meta, f)
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise
  if os.path.exists(path):
    os.replace(path, old)
  os.replace(tmp, path)
  shutil.rmtree(old, ignore_errors=True)


def read_meta(path):
  """{'kind', 'width_div', 'num_classes'} of the export folder `path` (num_classes: the class head's outputs, None for
  a model without one; exports written before it was recorded are VOC's 21); no, unreadable or damaged model.json ->
  DataError naming it."""
  meta = os.path.join(path, META)
  if not os.path.isfile(meta):
    raise DataError(f'{path} is not a seam_jax export folder (no {META})')
  try:
    with open(meta, encoding='utf-8') as f:
      d = json.load(f)
  except (OSError, ValueError) as e:   # JSONDecodeError and UnicodeDecodeError are ValueErrors
    raise DataError(f'{meta}: damaged export metadata ({describe(e)}); export or convert the weights again') from None
  ok = (isinstance(d, dict) and d.get('kind') in models.MODELS and type(d.get('width_div')) is int  # not a bool
        and d['width_div'] > 0)
  if ok and d['kind'] in CLASS_HEAD:
    d.setdefault('num_classes', voc.NUM_CLASSES)
    ok = type(d['num_classes']) is int and d['num_classes'] > 1
  if not ok:
    raise DataError(f'{meta}: damaged export metadata: expected {{"kind": one of {sorted(models.MODELS)}, '
                    f'"width_div": a positive integer, "num_classes": an integer > 1 (class-head models)}}, found '
                    f'{json.dumps(d)[:100]}')
  return {**d, 'num_classes': d.get('num_classes')}


def load_export(path, kind, model_config, num_classes=None):
  """The {'params', 'batch_stats'} of the export folder `path` (of model `kind`, else a DataError); with
  `num_classes` (K + 1) an export of another class count is a DataError naming it and both counts (None: as saved).
  A damaged folder (files truncated or deleted) is a DataError naming it."""
  meta = read_meta(path)
  if meta['kind'] != kind or meta['width_div'] != model_config.width_div:
    raise DataError(f'{path} holds a {meta["kind"]} model of width_div {meta["width_div"]}, '
                    f'expected {kind} of width_div {model_config.width_div}')
  if num_classes is not None and kind in CLASS_HEAD and meta['num_classes'] != num_classes:
    raise head_mismatch(path, f'params/{CLASS_HEAD[kind]}', meta['num_classes'], num_classes)
  variables = os.path.join(os.path.abspath(path), 'variables')
  try:
    with ocp.StandardCheckpointer(multiprocessing_options=_this_process_only()) as ckptr:  # no barrier
      return ckptr.restore(variables)
  except (OSError, ValueError, KeyError, TypeError) as e:   # orbax / tensorstore / json: many types, one cause
    raise DataError(f'{variables}: damaged export, its weights cannot be read ({describe(e)}); export or convert '
                    'them again') from None
