"""What made each output: the record of a stage run, and whether the outputs on disk are still those of the config.

A stage's *record* holds what its outputs are a function of: the config fields the stage reads (declared with the
stage in seam_jax.stages as field patterns), a fingerprint of each of its inputs, and the package version. It is
written to <workdir>/records/<stage>.json when the stage starts (state 'running') and again when it ends (state
'complete', with a fingerprint of its outputs). Before a stage runs, the record it would write now is compared with
the stored one (`check`):

  missing     no outputs yet (or the inputs are not there yet)                  -> run
  incomplete  same record, but the run was interrupted or an output is missing   -> run, resuming
  stale       the record changed (a field, an input, the version), or outputs   -> run from scratch, and say why
              exist without a record, or were changed after the run
  complete    same record, every output present and unchanged                   -> skip

Fingerprints: a file of at most SMALL_FILE bytes (lists, label files, metadata) by its content; larger files and
folders (weights, per-image outputs) by the names, sizes and modification times of their files (one stat each:
a status check of a VOC-sized run reads no image data).

Field patterns: 'train' (every field of the section), 'train.lr' (one field), '!data.aff_canvas' (leave one out).
Fields in EXECUTION_ONLY (worker counts, logging and checkpoint cadence, `force`) never enter a record: they change
how a result is computed, not what it is.
"""
import hashlib
import json
import os
import time

from seam_jax import __version__
from seam_jax.common import errors, files

SMALL_FILE = 16 << 20   # bytes: larger files are fingerprinted by stat
GROUP = 8               # more files of one folder than this: one input, by stat
EXECUTION_ONLY = frozenset({'force', 'workers', 'threads', 'num_workers', 'prefetch', 'crf_workers', 'max_pending',
                            'log_every', 'ckpt_every', 'keep_checkpoints', 'image_summaries'})


# ------------------------------------------------------------------------------------------------ config fields
def plain(value):
  """JSON-comparable form of a config value (tuples -> lists, ConfigDicts -> dicts)."""
  if hasattr(value, 'to_dict'):
    value = value.to_dict()
  if isinstance(value, dict):
    return {str(k): plain(v) for k, v in value.items()}
  if isinstance(value, (list, tuple)):
    return [plain(v) for v in value]
  return value


def read_fields(config, patterns):
  """{'section.key': value} of the fields `patterns` select (module doc), sorted; fields of a section the config
  does not have are left out (a VOC config has no `demo`); a named field missing from a present section is a
  DataError (a typo in a stage's declaration)."""
  out, dropped = {}, set()
  for pattern in patterns:
    negate, name = pattern.startswith('!'), pattern.lstrip('!')
    section, _, key = name.partition('.')
    if section not in config:
      continue
    node = config[section]
    if not key:
      items = ({name: node} if not hasattr(node, 'keys') else
               {f'{section}.{k}': node[k] for k in node.keys() if k not in EXECUTION_ONLY})
    elif key in node:
      items = {name: node[key]}
    else:
      raise errors.DataError(f'stage field {name!r}: the config has no such key')
    if negate:
      dropped.update(items)
    else:
      out.update(items)
  return {k: plain(out[k]) for k in sorted(out) if k not in dropped}


# ------------------------------------------------------------------------------------------------ fingerprints
def _stat_digest(paths):
  h = hashlib.sha256()
  for p in sorted(paths):
    st = os.stat(p)
    h.update(f'{p}\0{st.st_size}\0{st.st_mtime_ns}\n'.encode())
  return 'stat:' + h.hexdigest()[:24]


def fingerprint(path):
  """Digest of a file or folder (module doc); None when it does not exist."""
  if os.path.isdir(path):
    return _stat_digest([os.path.join(d, f) for d, _, fs in os.walk(path) for f in fs])
  if not os.path.isfile(path):
    return None
  if os.path.getsize(path) > SMALL_FILE:
    return _stat_digest([path])
  h = hashlib.sha256()
  with open(path, 'rb') as f:
    for chunk in iter(lambda: f.read(1 << 20), b''):
      h.update(chunk)
  return 'sha256:' + h.hexdigest()[:24]


def fingerprint_inputs(paths):
  """{name: digest} of a stage's inputs; None when one is missing. More than GROUP files of one folder count as one
  input (a CAM folder, named '<folder>/ (N files)', by stat); other files and folders by their own fingerprint."""
  if not all(os.path.exists(p) for p in paths):
    return None
  groups = {}
  for p in paths:
    groups.setdefault(os.path.dirname(p) if os.path.isfile(p) else p, []).append(p)
  out = {}
  for key, members in sorted(groups.items()):
    if len(members) > GROUP:
      out[f'{key}{os.sep} ({len(members)} files)'] = _stat_digest(members)
    else:
      out.update({p: fingerprint(p) for p in members})
  return out


def fingerprint_outputs(paths):
  """One digest of a stage's outputs (files or folders); None when one is missing."""
  if not all(os.path.exists(p) for p in paths):
    return None
  h = hashlib.sha256()
  for p in sorted(paths):
    h.update(f'{p}\0{fingerprint(p) if os.path.isdir(p) else _stat_digest([p])}\n'.encode())
  return h.hexdigest()[:24]


# ------------------------------------------------------------------------------------------------ records
def record_path(workdir, stage_name):
  return os.path.join(workdir, 'records', stage_name + '.json')


def make_record(fields, inputs):
  return {'version': __version__, 'fields': fields, 'inputs': inputs}


def read_record(workdir, stage_name):
  """The stored record of a stage (None if there is none; an unreadable one is treated as none: the stage reruns)."""
  path = record_path(workdir, stage_name)
  try:
    with open(path) as f:
      rec = json.load(f)
    return rec if isinstance(rec, dict) and 'fields' in rec else None
  except (OSError, ValueError):
    return None


def write_record(workdir, stage_name, record, state, outputs=None):
  rec = dict(record, stage=stage_name, state=state, time=time.strftime('%Y-%m-%d %H:%M:%S'))
  if outputs is not None:
    rec['outputs'] = outputs
  files.atomic_write_text(record_path(workdir, stage_name), json.dumps(rec, indent=1, sort_keys=True))


def _short(value):
  text = json.dumps(value)
  return text if len(text) <= 40 else text[:37] + '...'


def differences(old, new):
  """Readable reasons why record `new` differs from `old`: 'train.lr 0.01 -> 0.02', 'input X changed', ..."""
  out = []
  if old.get('version') != new['version']:
    out.append(f'seam_jax {old.get("version")} -> {new["version"]}')
  of, nf = old.get('fields', {}), new['fields']
  for k in sorted(set(of) | set(nf)):
    if of.get(k, '<unset>') != nf.get(k, '<unset>'):
      out.append(f'{k} {_short(of.get(k, "<unset>"))} -> {_short(nf.get(k, "<unset>"))}')
  oi, ni = old.get('inputs', {}), new['inputs']
  for k in sorted(set(oi) | set(ni)):
    if k not in oi:
      out.append(f'new input {k}')
    elif k not in ni:
      out.append(f'input {k} no longer read')
    elif oi[k] != ni[k]:
      out.append(f'input {k} changed')
  return out


def check(workdir, stage_name, fields, input_paths, output_paths):
  """(state, reasons, record): the stage's state (module doc), why, and the record a run would write now (None
  while the inputs or the output list are unknown)."""
  if input_paths is None or output_paths is None:
    return 'missing', ['inputs not made yet'], None
  inputs = fingerprint_inputs(input_paths)
  if inputs is None:
    missing = next(p for p in input_paths if not os.path.exists(p))
    return 'missing', [f'input missing: {missing}'], None
  record = make_record(fields, inputs)
  stored = read_record(workdir, stage_name)
  present = [p for p in output_paths if os.path.exists(p)]
  if stored is None:
    if present:
      return 'stale', [f'{len(present)} outputs without a record of what made them'], record
    return 'missing', [], record
  reasons = differences(stored, record)
  if reasons:
    return 'stale', reasons, record
  if stored.get('state') != 'complete':
    return 'incomplete', ['interrupted: resuming'], record
  if len(present) < len(output_paths):
    return 'incomplete', [f'{len(output_paths) - len(present)} outputs missing'], record
  if stored.get('outputs') != fingerprint_outputs(output_paths):
    return 'stale', ['outputs changed after they were made'], record
  return 'complete', [], record
