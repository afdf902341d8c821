"""Weight conversion: .pth <-> variables, the torch-free .pth reader, MXNet .params, export folders, the CLI."""
import collections
import errno
import logging
import os
import struct
import subprocess
import sys

import flax
import jax
import numpy as np
import pytest
import torch

from seam_jax.common.errors import DataError
from seam_jax.models import convert
from seam_jax.models import export
from torch_reference import models as ref_lib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
REFS = {'seam': ref_lib.SEAMRef, 'affinity': ref_lib.AffinityRef}
CFG32 = convert.model_config(32)


def make_ref(kind, width_div=32, seed=0):
  return ref_lib.randomize_(REFS[kind](width_div), seed)


def without_counters(sd):
  return {k: v for k, v in sd.items() if not k.endswith('num_batches_tracked')}


def flat(variables):
  return {(c, *p): np.asarray(x) for c in variables
          for p, x in flax.traverse_util.flatten_dict(flax.core.unfreeze(variables[c])).items()}


def assert_same_tree(a, b):
  fa, fb = flat(a), flat(b)
  assert fa.keys() == fb.keys()
  for k in fa:
    assert fa[k].dtype == fb[k].dtype and fa[k].shape == fb[k].shape, k
    np.testing.assert_array_equal(fa[k], fb[k], err_msg=str(k))


@pytest.mark.parametrize('kind', ['seam', 'affinity'])
def test_pth_round_trip_is_exact(kind, tmp_path):
  ref = make_ref(kind)
  src, dst = str(tmp_path / 'in.pth'), str(tmp_path / 'out.pth')
  torch.save(ref.state_dict(), src)
  variables = convert.load_pth(src, kind, CFG32)
  kernel = variables['params']['backbone']['b4_3']['conv_branch2a']['kernel']
  np.testing.assert_array_equal(kernel, ref.b4_3.conv_branch2a.weight.detach().numpy().transpose(2, 3, 1, 0))
  np.testing.assert_array_equal(variables['batch_stats']['backbone']['bn7']['var'], ref.bn7.running_var.numpy())
  convert.write_pth(dst, convert.variables_to_state_dict(variables, kind))
  back = torch.load(dst, weights_only=True)
  expected = without_counters(ref.state_dict())
  assert back.keys() == expected.keys()
  for k, v in expected.items():
    assert torch.equal(back[k], v), k
  REFS[kind](32).load_state_dict(back)   # strict load into the original layout works


def test_dataparallel_prefix_and_wrapped_state_dict(tmp_path):
  ref = make_ref('seam')
  path = str(tmp_path / 'dp.pth')
  torch.save({'state_dict': {'module.' + k: v for k, v in ref.state_dict().items()}}, path)
  direct = convert.state_dict_to_variables(ref_lib.state_dict_numpy(ref), 'seam', CFG32)
  assert_same_tree(convert.load_pth(path, 'seam', CFG32), direct)


@pytest.mark.parametrize('zip_format', [True, False])
def test_numpy_pth_reader_matches_torch(zip_format, tmp_path):
  big = torch.arange(20, dtype=torch.float32) * 1.5
  sd = make_ref('affinity').state_dict()   # an OrderedDict carrying `_metadata`, as the original saved it
  assert hasattr(sd, '_metadata')
  sd.update({'view': big[3:7], 'big': big, 'transposed': torch.randn(3, 5).t(), 'half': torch.randn(4).half(),
             'bf16': torch.randn(2, 3).bfloat16(), 'scalar': torch.tensor(7), 'flags': torch.tensor([True, False])})
  path = str(tmp_path / 'w.pth')
  torch.save(sd, path, _use_new_zipfile_serialization=zip_format)
  with_torch, without = convert.read_pth(path, use_torch=True), convert.read_pth(path, use_torch=False)
  assert list(with_torch) == list(without) == list(sd)
  for k in sd:
    assert with_torch[k].dtype == without[k].dtype and with_torch[k].shape == without[k].shape, k
    np.testing.assert_array_equal(with_torch[k], without[k], err_msg=k)
  np.testing.assert_array_equal(without['view'], [4.5, 6., 7.5, 9.])
  assert without['bf16'].dtype == np.float32


@pytest.mark.parametrize('use_torch', [True, False])
def test_pth_with_other_objects_is_refused(use_torch, tmp_path):
  path = str(tmp_path / 'evil.pth')
  torch.save({'w': torch.zeros(2), 'x': collections.Counter(a=1)}, path)
  with pytest.raises(DataError, match='evil.pth'):
    convert.read_pth(path, use_torch=use_torch)
  with open(str(tmp_path / 'junk.pth'), 'wb') as f:
    f.write(b'not a checkpoint')
  with pytest.raises(DataError, match='junk.pth'):
    convert.read_pth(str(tmp_path / 'junk.pth'), use_torch=use_torch)


def test_wrong_model_or_width_names_the_file(tmp_path):
  aff = str(tmp_path / 'aff_weights.pth')
  torch.save(make_ref('affinity').state_dict(), aff)
  with pytest.raises(DataError, match=r'aff_weights\.pth.*wrong model.*affinity'):
    convert.load_variables(aff, 'seam', CFG32)
  with pytest.raises(DataError, match=r'aff_weights\.pth.*width'):
    convert.load_variables(aff, 'affinity', convert.model_config(16))
  npz = str(tmp_path / 'seam16.npz')
  convert.write_npz(npz, ref_lib.state_dict_numpy(make_ref('seam', 16)))
  with pytest.raises(DataError, match=r'seam16\.npz.*width'):
    convert.load_variables(npz, 'seam', CFG32)
  assert_same_tree(convert.load_variables(npz, 'seam', convert.model_config(16)),
                   convert.state_dict_to_variables(ref_lib.state_dict_numpy(make_ref('seam', 16)), 'seam',
                                                   convert.model_config(16)))


def test_export_folder_round_trip(tmp_path):
  variables = convert.state_dict_to_variables(ref_lib.state_dict_numpy(make_ref('seam')), 'seam', CFG32)
  path = str(tmp_path / 'export')
  export.save_export(path, variables, 'seam', CFG32)
  assert_same_tree(convert.load_variables(path, 'seam', CFG32), variables)
  with pytest.raises(DataError, match='export'):
    convert.load_variables(path, 'affinity', CFG32)


# ----------------------------------------------------------------------------- MXNet

def mxnet_name(name):
  """Inverse of the spec's mapping: the ImageNet file's name of an original backbone tensor."""
  bn = {'weight': 'gamma', 'bias': 'beta', 'running_mean': 'moving_mean', 'running_var': 'moving_var'}
  parts = name.split('.')
  if parts[0] == 'conv1a':
    return 'arg:conv1a_weight'
  if parts[0] == 'bn7':
    return ('aux:' if 'running' in parts[1] else 'arg:') + 'bn7_' + bn[parts[1]]
  block, layer, param = parts
  stage, _, index = block[1:].partition('_')
  tag = f'{stage}b{index}' if index else f'{stage}a'
  kind, branch = layer.split('_', 1)
  if kind == 'conv':
    return f'arg:res{tag}_{branch}_weight'
  return ('aux:' if 'running' in param else 'arg:') + f'bn{tag}_{branch}_{bn[param]}'


def imagenet_file(path, width_div=32, seed=3):
  """A ResNet38 ImageNet .params as the original's (backbone + a 1000-way classifier); returns the backbone."""
  ref = ref_lib.randomize_(ref_lib.ResNet38Ref(width_div), seed)
  backbone = without_counters(ref_lib.state_dict_numpy(ref))
  d = {mxnet_name(k): v for k, v in backbone.items()}
  d['arg:linear1000_weight'] = np.ones((1000, 4096 // width_div), np.float32)
  d['arg:linear1000_bias'] = np.zeros(1000, np.float32)
  convert.write_mxnet_params(path, d)
  return backbone, d


def test_mxnet_names_follow_the_original_mapping():
  names = convert.mxnet_to_torch_names({k: 0 for k in (
      'arg:res4b3_branch2a_weight', 'aux:bn5b2_branch2b1_moving_var', 'arg:bn4a_branch2a_gamma',
      'arg:res2a_branch1_weight', 'arg:res7a_branch2b2_weight', 'arg:bn7_beta', 'aux:bn7_moving_mean',
      'arg:conv1a_weight', 'arg:linear1000_weight', 'arg:linear1000_bias')})
  assert sorted(names) == sorted([
      'b4_3.conv_branch2a.weight', 'b5_2.bn_branch2b1.running_var', 'b4.bn_branch2a.weight',
      'b2.conv_branch1.weight', 'b7.conv_branch2b2.weight', 'bn7.bias', 'bn7.running_mean', 'conv1a.weight'])


def test_mxnet_file_read_map_and_imagenet_init(tmp_path, caplog):
  path = str(tmp_path / 'ilsvrc-cls_rna-a1_cls1000_ep-0001.params')
  backbone, d = imagenet_file(path)
  raw = convert.read_mxnet_params(path)
  assert list(raw) == list(d)
  for k in d:
    np.testing.assert_array_equal(raw[k], d[k])
  mapped = convert.mxnet_to_torch_names(raw)
  assert mapped.keys() == backbone.keys()
  init = convert.state_dict_to_variables(ref_lib.state_dict_numpy(make_ref('seam', seed=5)), 'seam', CFG32)
  with caplog.at_level(logging.INFO):
    loaded = convert.imagenet_init(init, path, 'seam', CFG32)
  n = len(backbone)
  assert f'loaded {n} of {n} backbone tensors' in caplog.text
  direct = flat(convert.state_dict_to_variables(
      {**convert.variables_to_state_dict(init, 'seam'), **backbone}, 'seam', CFG32))
  got, before = flat(loaded), flat(init)
  for k, v in got.items():
    np.testing.assert_array_equal(v, direct[k] if k[1] == 'backbone' else before[k], err_msg=str(k))
  cfg16 = convert.model_config(16)
  with pytest.raises(DataError, match='params.*width_div 16'):
    convert.imagenet_init(convert.abstract_variables('affinity', cfg16), path, 'affinity', cfg16)


def test_imagenet_init_is_non_strict(tmp_path, caplog):
  backbone = without_counters(ref_lib.state_dict_numpy(ref_lib.randomize_(ref_lib.ResNet38Ref(32), 4)))
  partial = {k: v for k, v in backbone.items() if not k.startswith('b7.')}
  path = str(tmp_path / 'partial.npz')
  convert.write_npz(path, partial)
  init = convert.state_dict_to_variables(ref_lib.state_dict_numpy(make_ref('affinity', seed=1)), 'affinity', CFG32)
  with caplog.at_level(logging.INFO):
    loaded = convert.imagenet_init(init, path, 'affinity', CFG32)
  assert f'loaded {len(partial)} of {len(backbone)} backbone tensors; {len(backbone) - len(partial)} missing' in (
      caplog.text)
  np.testing.assert_array_equal(loaded['params']['backbone']['b7']['conv_branch1']['kernel'],
                                init['params']['backbone']['b7']['conv_branch1']['kernel'])
  np.testing.assert_array_equal(loaded['batch_stats']['backbone']['b6']['bn_branch2a']['mean'],
                                partial['b6.bn_branch2a.running_mean'])


def test_mxnet_byte_layout_of_every_version(tmp_path):
  """Bytes built here from the layout in apache/mxnet ndarray.cc (V2 writer; V1 and legacy readers)."""
  a = np.arange(6, dtype=np.float32).reshape(2, 3)
  b = np.array([5, -7], np.int64)
  path = str(tmp_path / 'x.params')
  convert.write_mxnet_params(path, {'arg:a': a})
  name = struct.pack('<Q', 5) + b'arg:a'
  v2 = struct.pack('<IiiqqiiI', 0xF993FAC9, 0, 2, 2, 3, 1, 0, 0) + a.tobytes()
  with open(path, 'rb') as f:
    assert f.read() == struct.pack('<QQQ', 0x112, 0, 1) + v2 + struct.pack('<Q', 1) + name
  v1 = struct.pack('<Iiqiii', 0xF993FAC8, 1, 2, 2, 0, 6) + b.tobytes()
  legacy = struct.pack('<IIIiii', 2, 2, 3, 1, 0, 0) + a.tobytes()
  empty = struct.pack('<I', 0)   # legacy ndim 0: an empty NDArray, nothing follows
  names = struct.pack('<Q', 4) + name + b''.join(struct.pack('<Q', len(n)) + n for n in (b'v1', b'old', b'none'))
  with open(path, 'wb') as f:
    f.write(struct.pack('<QQQ', 0x112, 0, 4) + v2 + v1 + legacy + empty + names)
  got = convert.read_mxnet_params(path)
  assert list(got) == ['arg:a', 'v1', 'old']
  np.testing.assert_array_equal(got['arg:a'], a)
  np.testing.assert_array_equal(got['old'], a)
  assert got['v1'].dtype == np.int64 and list(got['v1']) == [5, -7]
  with open(path, 'wb') as f:
    f.write(struct.pack('<QQQ', 0x112, 0, 1) + v2[:-4])
  with pytest.raises(DataError, match='x.params.*truncated'):
    convert.read_mxnet_params(path)


# ----------------------------------------------------------------------------- CLI

def test_cli_round_trips(tmp_path):
  ref = make_ref('seam')
  src = str(tmp_path / 'seam.pth')
  torch.save(ref.state_dict(), src)
  export, out, npz = str(tmp_path / 'export'), str(tmp_path / 'back.pth'), str(tmp_path / 'back.npz')
  args = ['--kind', 'seam', '--width_div', '32']
  convert.main(['--src', src, '--dst', export] + args)
  convert.main(['--src', export, '--dst', out] + args)
  convert.main(['--src', export, '--dst', npz] + args)
  expected = without_counters(ref_lib.state_dict_numpy(ref))
  for got in (convert.read_pth(out), convert.read_npz(npz)):
    assert got.keys() == expected.keys()
    for k in expected:
      np.testing.assert_array_equal(got[k], expected[k], err_msg=k)
  with pytest.raises(SystemExit, match='missing.pth'):
    convert.main(['--src', str(tmp_path / 'missing.pth'), '--dst', export] + args)


@pytest.mark.slow
def test_cli_module_converts_mxnet_params(tmp_path):
  params, out_dir = str(tmp_path / 'in.params'), str(tmp_path / 'aff_export')
  backbone, _ = imagenet_file(params)
  env = {**os.environ, 'PYTHONPATH': ROOT, 'XLA_FLAGS': ''}
  cmd = [sys.executable, '-m', 'seam_jax.models.convert', '--src', params, '--dst', out_dir, '--kind', 'affinity',
         '--width_div', '32']
  run = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300, check=False)
  assert run.returncode == 0, run.stderr
  assert run.stdout == f'wrote {out_dir}\n'
  assert 'orbax' not in run.stderr.lower() and len(run.stderr.splitlines()) <= 2, run.stderr   # its summary only
  variables = convert.load_variables(out_dir, 'affinity', CFG32)
  np.testing.assert_array_equal(variables['params']['backbone']['conv1a']['kernel'],
                                backbone['conv1a.weight'].transpose(2, 3, 1, 0))
  missing = str(tmp_path / 'missing.params')
  bad = subprocess.run(cmd[:4] + [missing] + cmd[5:], cwd=ROOT, env=env, capture_output=True, text=True,
                       timeout=300, check=False)
  assert bad.returncode != 0 and 'missing.params' in bad.stderr and 'Traceback' not in bad.stderr
  assert bad.stderr.splitlines() == [f'error: checkpoint not found: {missing}'], bad.stderr
  blocker = str(tmp_path / 'blocker')
  open(blocker, 'w').close()
  blocked = subprocess.run(cmd[:6] + [os.path.join(blocker, 'export')] + cmd[7:], cwd=ROOT, env=env,
                           capture_output=True, text=True, timeout=300, check=False)
  assert blocked.returncode == 1 and blocked.stderr.splitlines()[1:] == [   # after its summary line
      f'error: cannot write {blocker}/export.tmp: Not a directory (a file stands where a folder is needed)'], (
          blocked.stderr)


# ----------------------------------------------------------------------------- weights that do not fit: one clear line

def test_mxnet_weights_of_another_network_are_refused(tmp_path):
  """Names ResNet38 does not have are named, not guessed as `bn7.*`; two names of one tensor do not overwrite."""
  path = str(tmp_path / 'resnet50.params')
  convert.write_mxnet_params(path, {'arg:conv1a_weight': np.zeros((2, 3, 3, 3), np.float32),
                                    'arg:stage1_unit1_conv1_weight': np.zeros((4, 2, 1, 1), np.float32),
                                    'aux:stage1_unit1_bn1_moving_var': np.ones(4, np.float32)})
  with pytest.raises(DataError, match=r'resnet50\.params.*2 of its 3 names.*stage1_unit1_bn1_moving_var') as e:
    convert.load_variables(path, 'seam', CFG32)
  assert 'bn7' not in str(e.value) and 'width' not in str(e.value)
  with pytest.raises(DataError, match=r"x\.params: 'arg:bn7_moving_mean' and 'aux:bn7_moving_mean' are both"):
    convert.mxnet_to_torch_names({'arg:bn7_moving_mean': 0, 'aux:bn7_moving_mean': 1}, 'x.params')


def test_mxnet_list_saved_without_names(tmp_path):
  """mx.nd.save of a list writes the arrays and an empty name list: nothing says which layer each array is. Two
  arrays of one name would overwrite each other."""
  path = str(tmp_path / 'list.params')
  arrays = struct.pack('<QQQ', 0x112, 0, 2) + 2 * (struct.pack('<Iiiqiii', 0xF993FAC9, 0, 1, 3, 1, 0, 0) +
                                                  np.zeros(3, np.float32).tobytes())
  twice = struct.pack('<Q', 2) + 2 * (struct.pack('<Q', 12) + b'arg:bn7_beta')
  for names, match in [(struct.pack('<Q', 0), '2 MXNet arrays without names'),
                       (twice, r"names stored twice: \['arg:bn7_beta'\]")]:
    with open(path, 'wb') as f:
      f.write(arrays + names)
    with pytest.raises(DataError, match=r'list\.params: ' + match):
      convert.load_variables(path, 'seam', CFG32)


@pytest.mark.slow
def test_mismatch_names_the_files_own_keys(tmp_path):
  """Missing / unexpected keys and shape mismatches are counted and named as the file names them."""
  params = str(tmp_path / 'w32.params')
  imagenet_file(params)
  cfg16 = convert.model_config(16)
  with pytest.raises(DataError, match=r'w32\.params: 191 of 191 tensors have other shapes.*'
                                      r'arg:bn2a_branch2a_beta \(2,\) vs model \(4,\)'):
    convert.load_variables(params, 'affinity', cfg16)
  npz = str(tmp_path / 'aff_dp.npz')
  aff = without_counters(ref_lib.state_dict_numpy(make_ref('affinity')))
  convert.write_npz(npz, {'module.' + k: v for k, v in aff.items()})
  with pytest.raises(DataError, match=r'aff_dp\.npz: .*an affinity checkpoint; it holds 195 tensors, the model 195\); '
                                      r'1 missing key: fc8\.weight; 1 unexpected key: module\.f8_5\.weight'):
    convert.load_variables(npz, 'seam', CFG32)
  convert.write_npz(npz, {**aff, 'module.conv1a.weight': aff['conv1a.weight']})
  with pytest.raises(DataError, match=r"aff_dp\.npz: 'conv1a\.weight' and 'module\.conv1a\.weight' are both"):
    convert.load_variables(npz, 'affinity', CFG32)


def zero_export(path, kind='seam'):
  variables = convert.abstract_variables(kind, CFG32)
  export.save_export(path, jax.tree.map(lambda s: np.zeros(s.shape, s.dtype), variables), kind, CFG32)


@pytest.mark.parametrize('damage, match', [
    ('truncate model.json', r'model\.json: damaged export metadata \(JSONDecodeError'),
    ('model.json of a list', r'model\.json: damaged export metadata: expected .*found \[1\]'),
    ('truncate the weights', r'export/variables: damaged export, its weights cannot be read \(ValueError'),
    ('delete _METADATA', r'export/variables: damaged export, its weights cannot be read \(FileNotFoundError'),
])
def test_damaged_export_is_one_data_error(damage, match, tmp_path):
  path = str(tmp_path / 'export')
  zero_export(path)
  meta, variables = os.path.join(path, export.META), os.path.join(path, 'variables')
  if damage == 'truncate model.json':
    os.truncate(meta, os.path.getsize(meta) // 2)
  elif damage == 'model.json of a list':
    with open(meta, 'w') as f:
      f.write('[1]')
  elif damage == 'truncate the weights':
    for name in os.listdir(os.path.join(variables, 'd')):
      os.truncate(os.path.join(variables, 'd', name), 10)
  else:
    os.remove(os.path.join(variables, '_METADATA'))
  with pytest.raises(DataError, match=match) as e:
    convert.load_variables(path, 'seam', CFG32)
  assert len(str(e.value).splitlines()) == 1 and len(str(e.value)) < 400


def test_failed_export_write_leaves_the_old_export(tmp_path, monkeypatch):
  """A disk that fills up during the write: the previous export stays whole and no temporary folder is left."""
  path = str(tmp_path / 'export')
  zero_export(path)
  ones = jax.tree.map(np.ones_like, convert.load_variables(path, 'seam', CFG32))
  def full_disk(*unused):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
  monkeypatch.setattr(export.ocp.StandardCheckpointer, 'wait_until_finished', full_disk)
  with pytest.raises(OSError):
    export.save_export(path, ones, 'seam', CFG32)
  monkeypatch.undo()
  assert sorted(os.listdir(tmp_path)) == ['export']
  assert all(not x.any() for x in jax.tree.leaves(convert.load_variables(path, 'seam', CFG32)))
  export.save_export(path, ones, 'seam', CFG32)
  assert sorted(os.listdir(tmp_path)) == ['export']
  assert all(x.all() for x in jax.tree.leaves(convert.load_variables(path, 'seam', CFG32)))
