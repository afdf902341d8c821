"""Exported model weights: an orbax checkpoint of {'params', 'batch_stats'} plus `model.json` naming the model.

seam_jax.models.convert.load_variables is the single entry for every weight source (export folders, .pth, .npz,
MXNet .params). Loading an export of another model (or another width) is an error naming the folder.
"""
import json
import os
import shutil

import jax
import numpy as np
import orbax.checkpoint as ocp

from seam_jax.common.errors import DataError

META = 'model.json'


def _this_process_only():
  """orbax options for the calling process alone: an export is written by one process and read by any subset (an
  inference process with no images to do loads nothing), so no cross-process barrier."""
  return ocp.options.MultiprocessingOptions(primary_host=jax.process_index(), active_processes={jax.process_index()})


def save_export(path, variables, kind, model_config):
  """Write `variables` as an export folder at `path` (replaced atomically if it exists)."""
  path = os.path.abspath(path)
  tmp = path + '.tmp'
  if os.path.exists(tmp):
    shutil.rmtree(tmp)
  os.makedirs(tmp)
  host = jax.tree.map(lambda x: np.asarray(jax.device_get(x)), dict(variables))
  with ocp.StandardCheckpointer(multiprocessing_options=_this_process_only()) as ckptr:  # no barrier
    ckptr.save(os.path.join(tmp, 'variables'), host)
    ckptr.wait_until_finished()
  with open(os.path.join(tmp, META), 'w') as f:
    json.dump({'kind': kind, 'width_div': int(model_config.width_div)}, f)
  if os.path.exists(path):
    shutil.rmtree(path)
  os.replace(tmp, path)


def read_meta(path):
  meta = os.path.join(path, META)
  if not os.path.isfile(meta):
    raise DataError(f'{path} is not a seam_jax export folder (no {META})')
  with open(meta) as f:
    return json.load(f)


def load_export(path, kind, model_config):
  meta = read_meta(path)
  if meta['kind'] != kind or meta['width_div'] != model_config.width_div:
    raise DataError(f'{path} holds a {meta["kind"]} model of width_div {meta["width_div"]}, '
                    f'expected {kind} of width_div {model_config.width_div}')
  with ocp.StandardCheckpointer(multiprocessing_options=_this_process_only()) as ckptr:  # no barrier
    return ckptr.restore(os.path.join(os.path.abspath(path), 'variables'))
