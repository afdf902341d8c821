"""Exported model weights: an orbax checkpoint of {'params', 'batch_stats'} plus `model.json` naming the model.

seam_jax.models.convert.load_variables is the single entry for every weight source (export folders, .pth, .npz,
MXNet .params). Loading an export of another model (or another width), or a damaged one (model.json or weight files
truncated or deleted), is a DataError naming the folder or file.
"""
import json
import os
import shutil

import jax
import numpy as np
import orbax.checkpoint as ocp

from seam_jax import models
from seam_jax.common.errors import DataError, describe

META = 'model.json'


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
      json.dump({'kind': kind, 'width_div': int(model_config.width_div)}, f)
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise
  if os.path.exists(path):
    os.replace(path, old)
  os.replace(tmp, path)
  shutil.rmtree(old, ignore_errors=True)


def read_meta(path):
  """{'kind', 'width_div'} of the export folder `path`; no, unreadable or damaged model.json -> DataError naming it."""
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
  if not ok:
    raise DataError(f'{meta}: damaged export metadata: expected {{"kind": one of {sorted(models.MODELS)}, '
                    f'"width_div": a positive integer}}, found {json.dumps(d)[:100]}')
  return d


def load_export(path, kind, model_config):
  """The {'params', 'batch_stats'} of the export folder `path` (of model `kind`, else a DataError); a damaged
  folder (files truncated or deleted) is a DataError naming it."""
  meta = read_meta(path)
  if meta['kind'] != kind or meta['width_div'] != model_config.width_div:
    raise DataError(f'{path} holds a {meta["kind"]} model of width_div {meta["width_div"]}, '
                    f'expected {kind} of width_div {model_config.width_div}')
  variables = os.path.join(os.path.abspath(path), 'variables')
  try:
    with ocp.StandardCheckpointer(multiprocessing_options=_this_process_only()) as ckptr:  # no barrier
      return ckptr.restore(variables)
  except (OSError, ValueError, KeyError, TypeError) as e:   # orbax / tensorstore / json: many types, one cause
    raise DataError(f'{variables}: damaged export, its weights cannot be read ({describe(e)}); export or convert '
                    'them again') from None
