"""Weights of the original release <-> seam_jax variables (SEAM_SPEC sections 1, 2 and 6).

State dicts use the original PyTorch names (`b4_3.bn_branch2a.running_mean`, `fc8.weight`, ...) as NumPy arrays;
Flax variables mirror those names, so conversion is a rename plus OIHW <-> HWIO for conv kernels:
  `<m>.weight` (conv) <-> params/<m>/kernel, `<m>.weight|bias` (BN) <-> params/<m>/scale|bias,
  `<m>.running_mean|running_var` <-> batch_stats/<m>/mean|var; backbone modules live under `backbone/`.
Sources: PyTorch `.pth` (read with torch, or without it by a restricted unpickler), `.npz` of a state dict, and
the MXNet ImageNet `.params` of ResNet38 (read with NumPy, names mapped as in the original). The segmentation net
(kind 'deeplab': the authors' released deeplabv1 ResNet38 .pth) names its backbone tensors `backbone.<m>...`.

Class count: the class head (SEAM's fc8, DeepLab's cls_conv) has K + 1 outputs, `num_classes` (VOC: 21). Weights
whose head has another count are a DataError naming the file, the head and both counts; with `reinit_head=True` the
head starts afresh from the model's init instead (the backbone and the other layers load). ImageNet initialisation
(imagenet_init: backbone only) fits any K.

CLI: `python -m seam_jax.models.convert --src IN --dst OUT --kind seam|affinity|deeplab [--width_div 1]
[--num_classes K+1] [--reinit_head]` converts a .pth / .npz / .params into an export folder, or an export folder
into a .pth / .npz (--num_classes 0, the default: the source's own class count).
"""
import argparse
import functools
import os
import re

from absl import logging
import flax
import jax
import jax.numpy as jnp
import numpy as np

from configs import sections
from seam_jax.models import export
from seam_jax import models
from seam_jax.models.weight_files import (  # noqa: F401  (re-exported: callers use convert.read_pth, ...)
    has_torch, read_mxnet_params, read_npz, read_pth, write_mxnet_params, write_npz, write_pth)
from seam_jax.common import cli
from seam_jax.common.errors import DataError
from seam_jax.data import voc

_LEAF_NAMES = {('params', 'kernel'): 'weight', ('params', 'scale'): 'weight', ('params', 'bias'): 'bias',
               ('batch_stats', 'mean'): 'running_mean', ('batch_stats', 'var'): 'running_var'}
_HEADS = {'seam': models.seam.NEW_LAYERS, 'affinity': models.affinity.NEW_LAYERS,
          'deeplab': models.deeplab.NEW_LAYERS}
# Models whose original state dict nests the backbone as `backbone.<name>` (SSC's deeplabv1); SEAM's and
# AffinityNet's subclass the backbone (plain `<name>`).
_NESTED_BACKBONE = ('deeplab',)


# ----------------------------------------------------------------------------- names and layouts

def torch_name(collection, path):
  """('params', ('backbone', 'b4_3', 'bn_branch2a', 'scale')) -> 'b4_3.bn_branch2a.weight'."""
  modules = path[1:-1] if path[0] == 'backbone' else path[:-1]
  return '.'.join(modules + (_LEAF_NAMES[collection, path[-1]],))


def _entries(variables):
  """(torch name, collection, path, array) for every leaf of {'params', 'batch_stats'}."""
  for col in ('params', 'batch_stats'):
    for path, x in flax.traverse_util.flatten_dict(flax.core.unfreeze(variables.get(col, {}))).items():
      yield torch_name(col, path), col, path, x


def _to_torch(path, x):
  x = np.asarray(jax.device_get(x))
  return np.ascontiguousarray(x.transpose(3, 2, 0, 1)) if path[-1] == 'kernel' else x   # HWIO -> OIHW


def _from_torch(path, x):
  return np.ascontiguousarray(np.asarray(x).transpose(2, 3, 1, 0)) if path[-1] == 'kernel' else np.asarray(x)


def _torch_shape(path, shape):
  return tuple(shape[i] for i in (3, 2, 0, 1)) if path[-1] == 'kernel' else tuple(shape)


def _rename(sd, rename, source):
  """(sd with every key k renamed rename(k), dropped when None; new name -> key in `source`). Two keys of one new
  name are a DataError naming `source`, not one silently overwriting the other."""
  out, origin = {}, {}
  for k, v in sd.items():
    name = rename(k)
    if name is None:
      continue
    if name in out:
      raise DataError(f'{source}: {origin[name]!r} and {k!r} are both {name!r}')
    out[name], origin[name] = v, k
  return out, origin


def _clean_name(k):
  k = k[len('module.'):] if k.startswith('module.') else k
  k = k[len('backbone.'):] if k.startswith('backbone.') else k
  return None if k.endswith('num_batches_tracked') else k


def clean_state_dict(sd, source='state dict'):
  """(state dict, cleaned name -> key in `sd`): DataParallel's 'module.' prefix and a nested backbone's 'backbone.'
  prefix (the deeplabv1 release) stripped, BN `num_batches_tracked` counters dropped."""
  return _rename(sd, _clean_name, source)


def model_config(width_div=1, dtype='float32'):
  return sections.model(width_div=int(width_div), dtype=dtype)


def abstract_variables(kind, model_config_, num_classes=voc.NUM_CLASSES):
  """Shapes/dtypes of the model's variables, without allocating them (works for any width_div); `num_classes`: the
  class head's outputs, K + 1."""
  model = models.build(kind, model_config_, num_classes=num_classes)
  return jax.eval_shape(model.init, jax.random.PRNGKey(0), jnp.zeros((1, 32, 32, 3), jnp.float32))


def init_variables(kind, model_config_, seed=0, num_classes=voc.NUM_CLASSES):
  """Freshly initialised variables (the original's init distributions for the head layers); `num_classes` = K + 1.

  Uses an RBG key: with ~150 parameter tensors, threefry makes XLA's CPU compile of `init` several times slower.
  """
  init = _jitted_init(kind, int(model_config_.width_div), str(model_config_.dtype), int(num_classes))
  return init(jax.random.key(seed, impl='rbg'), jnp.zeros((1, 32, 32, 3), jnp.float32))


@functools.lru_cache(maxsize=8)
def _jitted_init(kind, width_div, dtype, num_classes):
  """model.init compiled once per model (a head re-initialisation per checkpoint read would compile it again)."""
  return jax.jit(models.build(kind, model_config(width_div, dtype), num_classes=num_classes).init)


def _few(keys, n=4):
  keys = sorted(keys)
  return ', '.join(keys[:n]) + (f' (+{len(keys) - n} more)' if len(keys) > n else '')


def _counted(what, keys, n=4):
  """'2 missing keys: a, b' / 'no missing keys'."""
  return f'{len(keys)} {what} key{"s" * (len(keys) != 1)}: {_few(keys, n)}' if keys else f'no {what} keys'


def _guess_kind(keys):
  """The model kind whose head layers are exactly those found among `keys`, if any."""
  tops = {k.split('.')[0] for k in keys}
  return next((kind for kind, h in _HEADS.items() if tops & set().union(*_HEADS.values()) == set(h)), None)


# ----------------------------------------------------------------------------- state dict <-> variables

def _assign(template, sd, names, source, kind, model_config_, origin):
  """`template` with the leaves named `names` replaced by sd[name] (torch layout); a shape mismatch is a DataError
  naming the tensor as `source` does (origin: name -> key in the file) with both shapes."""
  flat = {col: flax.traverse_util.flatten_dict(flax.core.unfreeze(template[col])) for col in template}
  entries = {t: (col, p, x) for t, col, p, x in _entries(template) if t in names}
  bad = [f'{origin[t]} {tuple(np.shape(sd[t]))} vs model {_torch_shape(p, x.shape)}'
         for t, (_, p, x) in entries.items() if tuple(np.shape(sd[t])) != _torch_shape(p, x.shape)]
  if bad:
    raise DataError(f'{source}: {len(bad)} of {len(entries)} tensors have other shapes than in the {kind} model of '
                    f'width_div {model_config_.width_div} (weights of another width?): {_few(bad, 3)}')
  for t, (col, p, x) in entries.items():
    flat[col][p] = _from_torch(p, np.asarray(sd[t], x.dtype))
  return {col: flax.traverse_util.unflatten_dict(f) for col, f in flat.items()}


def sd_head_outputs(sd, kind):
  """The class head's outputs (K + 1) of a cleaned original-named state dict of `kind`; None: no head there."""
  head = export.CLASS_HEAD.get(kind)
  return int(np.shape(sd[f'{head}.weight'])[0]) if head and f'{head}.weight' in sd else None


def state_dict_to_variables(sd, kind, model_config_, name='state dict', num_classes=voc.NUM_CLASSES,
                            reinit_head=False):
  """Strict conversion of an original state dict (name -> array) into {'params', 'batch_stats'} of `kind` with a
  class head of `num_classes` (K + 1; None: the state dict's own).

  Every model tensor must be present with the right shape and nothing else may be there; errors name `name`. A
  class head of another count is one DataError naming it and both counts, or with `reinit_head` keeps the model's
  init (seed 0; logged).
  """
  sd, origin = clean_state_dict(sd, name)
  have = sd_head_outputs(sd, kind)
  num_classes = num_classes or have or voc.NUM_CLASSES
  shapes = abstract_variables(kind, model_config_, num_classes)
  expected = {t for t, *_ in _entries(shapes)}
  missing, unexpected = expected - set(sd), set(sd) - expected
  if missing or unexpected:
    guess = _guess_kind(sd)
    article = 'an' if guess and guess[0] in 'aeiou' else 'a'
    hint = (f'this looks like {article} {guess} checkpoint' if guess and guess != kind else
            'not a checkpoint of this model')
    raise DataError(f'{name}: checkpoint of the wrong model for {kind!r} ({hint}; it holds {len(sd)} tensors, the '
                    f'model {len(expected)}); {_counted("missing", missing)}; '
                    f'{_counted("unexpected", [origin[k] for k in unexpected])}')
  if have is not None and have != num_classes:
    head = export.CLASS_HEAD[kind]
    if not reinit_head:
      raise export.head_mismatch(name, origin[f'{head}.weight'], have, num_classes)
    logging.info('%s: class head %s has %d outputs, the model %d: re-initialised (reinit_head)', name,
                 origin[f'{head}.weight'], have, num_classes)
    expected = {t for t in expected if t.split('.')[0] != head}
    shapes = init_variables(kind, model_config_, num_classes=num_classes)
  return _assign(shapes, sd, expected, name, kind, model_config_, origin)


def variables_to_state_dict(variables, kind):
  """Exact inverse of `state_dict_to_variables`: original names, OIHW kernels, NumPy arrays."""
  top = set(variables['params'])
  if top != {'backbone', *_HEADS[kind]}:
    raise ValueError(f'variables of modules {sorted(top)} are not a {kind} model')
  nested = kind in _NESTED_BACKBONE
  return {('backbone.' if nested and path[0] == 'backbone' else '') + t: _to_torch(path, x)
          for t, _, path, x in sorted(_entries(variables), key=lambda e: e[2][:-1])}


def load_pth(path, kind, model_config_, num_classes=voc.NUM_CLASSES, reinit_head=False):
  """Strictly load an original .pth (SEAM or AffinityNet) as variables of `kind` (state_dict_to_variables)."""
  return state_dict_to_variables(read_pth(path), kind, model_config_, path, num_classes, reinit_head)


def load_npz(path, kind, model_config_, num_classes=voc.NUM_CLASSES, reinit_head=False):
  return state_dict_to_variables(read_npz(path), kind, model_config_, path, num_classes, reinit_head)


_BN_PARAMS = {'beta': 'bias', 'gamma': 'weight', 'mean': 'running_mean', 'var': 'running_var'}
_MX_BN = r'(?:moving_)?(beta|gamma|mean|var)'
_MX_BN7 = re.compile(f'bn7_{_MX_BN}')
_MX_BLOCK = re.compile(rf'(res|bn)(\d)(a|b\d+)_(branch[0-9a-z]+)_(weight|{_MX_BN})')   # res4b3_branch2a_weight


def _mxnet_name(key):
  """The original's name of an ImageNet ResNet38 tensor (`arg:res4b3_branch2a_weight` -> `b4_3.conv_branch2a.weight`,
  SEAM_SPEC section 1); '' for the 1000-way classifier (dropped), None for a name ResNet38 does not have."""
  name = key.split(':', 1)[-1]
  if name.startswith('linear1000_'):
    return ''
  if name == 'conv1a_weight':
    return 'conv1a.weight'
  if m := _MX_BN7.fullmatch(name):
    return f'bn7.{_BN_PARAMS[m[1]]}'
  m = _MX_BLOCK.fullmatch(name)
  if m is None or (m[1] == 'res') != (m[5] == 'weight'):
    return None
  block = f'b{m[2]}' if m[3] == 'a' else f'b{m[2]}_{m[3][1:]}'
  return f'{block}.conv_{m[4]}.weight' if m[1] == 'res' else f'{block}.bn_{m[4]}.{_BN_PARAMS[m[6]]}'


def _from_mxnet(d, source):
  """(original-named state dict, name -> key in `source`) of MXNet ResNet38 weights; a name ResNet38 does not have
  (weights of another network) is a DataError naming `source` and a few such names, never a guess."""
  unknown = [k for k in d if _mxnet_name(k) is None]
  if unknown:
    raise DataError(f'{source}: not the ResNet38 ImageNet weights: {len(unknown)} of its {len(d)} names are not '
                    f'ResNet38 tensors ({_few(unknown)})')
  return _rename(d, lambda k: _mxnet_name(k) or None, source)


def mxnet_to_torch_names(d, source='MXNet weights'):
  """The original's names of the ImageNet ResNet38 MXNet tensors in `d`; the classifier is dropped."""
  return _from_mxnet(d, source)[0]


# ----------------------------------------------------------------------------- ImageNet initialisation

def read_weights(path):
  """(original-named state dict, name -> key in the file) of a .pth, .npz or MXNet .params file, or of an export
  folder (e.g. a trained SEAM's backbone for the segmentation retrain)."""
  if os.path.isdir(path):
    meta = export.read_meta(path)
    cfg = model_config(meta['width_div'])
    variables = export.load_export(path, meta['kind'], cfg)
    return clean_state_dict(variables_to_state_dict(variables, meta['kind']), path)
  if not os.path.isfile(path):
    raise DataError(f'weights file not found: {path}')
  if path.endswith('.params'):
    return _from_mxnet(read_mxnet_params(path), path)
  if path.endswith('.npz'):
    return clean_state_dict(read_npz(path), path)
  if path.endswith('.pth'):
    return clean_state_dict(read_pth(path), path)
  raise DataError(f'{path}: unknown weights format (expected .params, .pth or .npz)')


def imagenet_init(variables, path, kind, model_config_):
  """Non-strict load of the ResNet38 backbone from `path` into `variables`; the head keeps its init.

  Shape mismatches are errors (as in torch's non-strict load); absent tensors keep their init and are logged.
  """
  sd, origin = read_weights(path)
  backbone = {t for t, _, p, _ in _entries(variables) if p[0] == 'backbone'}
  loaded = backbone & set(sd)
  if not loaded:
    raise DataError(f'{path}: none of its {len(origin)} tensors is a ResNet38 backbone tensor '
                    f'({_few(origin.values(), 3) or "it holds none"})')
  variables = _assign(variables, sd, loaded, path, kind, model_config_, origin)
  missing, unused = backbone - loaded, set(sd) - loaded
  logging.info('%s: loaded %d of %d backbone tensors; %d missing%s; %d unused%s', path, len(loaded), len(backbone),
               len(missing), f' ({_few(missing)})' if missing else '', len(unused),
               f' ({_few(origin[k] for k in unused)})' if unused else '')
  return variables


# ----------------------------------------------------------------------------- CLI

def load_variables(path, kind, model_config, num_classes=voc.NUM_CLASSES, reinit_head=False):
  """Weights for model `kind` with a class head of `num_classes` (K + 1: layout.num_outputs; None: the source's own)
  from an export folder, a .pth / .npz or MXNet .params (see module doc). Weights of another class count are a
  DataError naming the file, the head and both counts; `reinit_head=True` re-initialises that head instead."""
  if not os.path.exists(path):
    raise DataError(f'checkpoint not found: {path}')
  if os.path.isdir(path):
    if not reinit_head:
      return export.load_export(path, kind, model_config, num_classes)
    variables = export.load_export(path, kind, model_config)
    if num_classes in (None, export.head_outputs(variables, kind)):
      return variables
    return state_dict_to_variables(variables_to_state_dict(variables, kind), kind, model_config, path, num_classes,
                                   reinit_head)
  if path.endswith('.pth'):
    return load_pth(path, kind, model_config, num_classes, reinit_head)
  if path.endswith('.npz'):   # an original-named state dict saved with NumPy (strict, like .pth)
    return load_npz(path, kind, model_config, num_classes, reinit_head)
  if path.endswith('.params'):  # MXNet ImageNet ResNet38: backbone only, the head keeps its init (seed 0)
    variables = init_variables(kind, model_config, num_classes=num_classes or voc.NUM_CLASSES)
    return imagenet_init(variables, path, kind, model_config)
  raise DataError(f'unknown checkpoint format: {path} (expected an export folder, .pth, .npz or .params)')


def convert(src, dst, kind, width_div=1, num_classes=None, reinit_head=False):
  """.pth / .npz -> export folder (strict), .params -> export folder (backbone; head from init),
  export folder -> .pth / .npz. `num_classes` (K + 1) of the result: None = the source's own (.params: VOC's 21);
  another count than the source's needs `reinit_head`."""
  cfg = model_config(width_div)
  if os.path.isdir(src):
    sd = variables_to_state_dict(load_variables(src, kind, cfg, num_classes, reinit_head), kind)
    if dst.endswith('.npz'):
      return write_npz(dst, sd)
    if dst.endswith('.pth'):
      return write_pth(dst, sd)
    raise DataError(f'{dst}: destination of an export folder must end in .pth or .npz')
  export.save_export(dst, load_variables(src, kind, cfg, num_classes, reinit_head), kind, cfg)


def main(argv=None):
  p = argparse.ArgumentParser(prog='python -m seam_jax.models.convert', description=convert.__doc__)
  p.add_argument('--src', required=True)
  p.add_argument('--dst', required=True)
  p.add_argument('--kind', required=True, choices=sorted(models.MODELS))
  p.add_argument('--width_div', type=int, default=1)
  p.add_argument('--num_classes', type=int, default=0,
                 help='class-head outputs of the result, background included (K + 1); 0: the source\'s own')
  p.add_argument('--reinit_head', action='store_true',
                 help='re-initialise a class head of another count than --num_classes instead of refusing it')
  args = p.parse_args(argv)
  logging.set_verbosity(logging.INFO)   # its own summary (imagenet_init); orbax's chatter is filtered out
  with cli.one_line_errors():
    convert(args.src, args.dst, args.kind, args.width_div, args.num_classes or None, args.reinit_head)
  print(f'wrote {args.dst}')


if __name__ == '__main__':
  main()
