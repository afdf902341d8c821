"""The CAM / score-dict format: round trip, one DataError naming the file for every malformed file, and the label and
background rules against per-pixel transcriptions of SEAM_SPEC sections 4, 5 and 7."""
import os

import numpy as np
import pytest

from seam_jax.common import errors, files
from seam_jax.infer import score_dicts as sd

HW = (4, 5)


def random_cams(rng, classes=(2, 7, 14), hw=HW):
  return {c: rng.uniform(-0.05, 1, hw).astype(np.float32) for c in classes}


def test_round_trip(tmp_path):
  rng = np.random.default_rng(0)
  cams = random_cams(rng)
  scores = {0: rng.random(HW).astype(np.float32), 3: rng.random(HW).astype(np.float32)}
  sd.write(str(tmp_path / 'cam.npy'), cams)
  sd.write(str(tmp_path / 'crf.npy'), scores, HW, sd.SCORES)
  sd.write(str(tmp_path / 'empty.npy'), {})                 # an image without a foreground label
  assert sorted(os.listdir(tmp_path)) == ['cam.npy', 'crf.npy', 'empty.npy']   # atomic: no temporary left
  for name, d, kind in (('cam', cams, sd.CAM), ('crf', scores, sd.SCORES), ('empty', {}, sd.CAM)):
    got = sd.read(str(tmp_path / f'{name}.npy'), HW, kind)
    assert list(got) == list(d) and all(type(k) is int for k in got)
    for k in d:
      assert got[k].dtype == np.float32 and np.array_equal(got[k], d[k])
  assert list(np.load(str(tmp_path / 'cam.npy'), allow_pickle=True).item()) == [2, 7, 14]   # the original's format


@pytest.mark.parametrize('content, kind, needle', [
    ({20: np.zeros(HW, np.float32)}, sd.CAM, 'keys'),                       # class index out of 0..19
    ({'3': np.zeros(HW, np.float32)}, sd.CAM, 'keys'),
    ({True: np.zeros(HW, np.float32)}, sd.CAM, 'keys'),
    ({3: np.zeros((4, 6), np.float32)}, sd.CAM, 'does not match'),          # not the image's size
    ({3: np.zeros(HW, np.float32), 5: np.zeros((3, 5), np.float32)}, sd.CAM, 'does not match'),
    ({3: np.zeros((1,) + HW, np.float32)}, sd.CAM, '2-D float'),
    ({3: np.zeros(HW, np.int64)}, sd.CAM, '2-D float'),
    ({3: [[0.] * 5] * 4}, sd.CAM, '2-D float'),
    ({3: np.zeros(HW, np.float32)}, sd.SCORES, 'background'),               # a score dict without entry 0
    ({0: np.zeros(HW, np.float32), 21: np.zeros(HW, np.float32)}, sd.SCORES, 'keys'),
])
def test_malformed_dicts_name_the_file(tmp_path, content, kind, needle):
  path = str(tmp_path / 'bad.npy')
  files.save_npy_dict(path, content)
  with pytest.raises(errors.DataError, match=needle) as e:
    sd.read(path, HW, kind)
  assert path in str(e.value) and '\n' not in str(e.value)
  with pytest.raises(errors.DataError, match=needle):   # the writer refuses it too
    sd.write(path, content, HW, kind)


class Evil:
  def __reduce__(self):
    return (os.system, ('echo pwned',))


@pytest.mark.parametrize('content, needle', [(np.zeros(HW, np.float32), 'dict'), ({3: Evil()}, 'refused')])
def test_not_a_dict_or_a_pickle_that_runs_code(tmp_path, content, needle):
  path = str(tmp_path / 'bad.npy')
  with open(path, 'wb') as f:
    np.save(f, content, allow_pickle=True)
  with pytest.raises(errors.DataError, match=needle) as e:
    sd.read(path)
  assert path in str(e.value)


def test_class_count_is_an_argument():
  d = {25: np.zeros(HW, np.float32)}
  with pytest.raises(errors.DataError, match='0..19'):
    sd.validate(d, 'x.npy')
  assert sd.validate(d, 'x.npy', HW, num_classes=30) is d
  assert sd.stack(d, HW, num_classes=30).shape == (30,) + HW
  assert sd.threshold_label(d, HW, 0.5, num_classes=30).max() == 0


def test_threshold_label_is_the_spec_rule():
  """SEAM_SPEC 5: zero-filled (21, H, W), class c at channel c + 1, channel 0 = t; label = argmax, ties -> the lowest
  channel (a tie with t is background). Exact ties with t and between classes included."""
  rng = np.random.default_rng(1)
  cams = random_cams(rng)
  cams[2][0] = 0.3                     # ties with the threshold
  cams[7][1] = cams[14][1]             # ties between classes
  t = 0.3
  got = sd.threshold_label(cams, HW, t)
  assert got.dtype == np.uint8
  for y in range(HW[0]):
    for x in range(HW[1]):
      channels = [t] + [float(cams[c - 1][y, x]) if c - 1 in cams else 0. for c in range(1, 21)]
      best = max(range(21), key=lambda k: (channels[k], -k))
      assert got[y, x] == best, (y, x)
  assert np.all(sd.threshold_label({}, HW, 0.) == 0)


def test_power_stack_is_the_crf_input():
  """SEAM_SPEC 4: probs = [(1 - max_k v) ** alpha, v in dict order] over the dict's classes, not renormalised;
  argmax_label maps channel i to its class index (key + 1, background 0)."""
  rng = np.random.default_rng(2)
  cams = random_cams(rng, (14, 2))
  for alpha in (4., 24.):
    labels, probs = sd.power_stack(cams, HW, alpha)
    assert labels.tolist() == [0, 15, 3] and probs.dtype == np.float32
    np.testing.assert_allclose(probs[0], (1 - np.maximum(cams[14], cams[2])) ** alpha, rtol=1e-6)
    np.testing.assert_array_equal(probs[1:], np.stack([cams[14], cams[2]]))
    label = sd.argmax_label(labels, probs)
    for y in range(HW[0]):
      for x in range(HW[1]):
        col = probs[:, y, x].tolist()
        assert label[y, x] == labels[col.index(max(col))]
  labels, probs = sd.power_stack({}, HW, 4.)
  assert labels.tolist() == [0] and np.all(probs == 1)      # no class: background 1


def test_dense_power_stack_is_the_walk_input():
  """SEAM_SPEC 7: (21, H, W), channel c + 1 = CAM c (absent 0), channel 0 = (1 - max over the 20 channels) ** alpha:
  absent classes count in the max, unlike the CRF's stack (they differ where every CAM is negative)."""
  rng = np.random.default_rng(3)
  cams = random_cams(rng, (3, 8))
  cams[3][0, 0] = cams[8][0, 0] = -0.5
  got = sd.dense_power_stack(cams, HW, 6.)
  assert got.shape == (21,) + HW and got.dtype == np.float32
  want = np.zeros((21,) + HW, np.float32)
  want[4], want[9] = cams[3], cams[8]
  want[0] = (1 - want[1:].max(0)) ** np.float32(6.)
  np.testing.assert_array_equal(got, want)
  assert got[0, 0, 0] == 1 and sd.power_stack(cams, HW, 6.)[1][0, 0, 0] == np.float32(1.5) ** 6


def test_scores_label_is_the_highest_key():
  bg = np.array([[.9, .2, .1], [.1, .3, .5]], np.float32)
  s3 = np.array([[.1, .5, .8], [.2, .2, .1]], np.float32)
  s15 = np.array([[.0, .5, .1], [.7, .6, .4]], np.float32)   # tie at (0, 1) with 3: the earlier key wins
  got = sd.scores_label({0: bg, 3: s3, 15: s15}, (2, 3))
  np.testing.assert_array_equal(got, [[0, 3, 3], [15, 15, 0]])
  np.testing.assert_array_equal(sd.scores_label({0: bg, 15: s15, 3: s3}, (2, 3)), [[0, 15, 3], [15, 15, 0]])
