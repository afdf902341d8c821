"""PyTorch reference of the original networks, written from SEAM_SPEC sections 1, 2 and 6 (test-only code).

NCHW, with the original module names so that `state_dict()` has the original keys (conv1a.weight,
b4_3.bn_branch2a.running_mean, fc8.weight, ...). `width_div` divides every channel count exactly like the Flax
models, so narrow nets of both can be compared. Used by the parity tests and the benchmarks; never imported by
the library.
"""
import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

RADIUS = 5


def _w(c, width_div):
  return max(c // width_div, 1)


def _conv(cin, cout, k, stride=1, dilation=1):
  pad = dilation if k == 3 else 0
  return nn.Conv2d(cin, cout, k, stride, padding=pad, dilation=dilation, bias=False)


class ResBlockRef(nn.Module):
  """Pre-activation basic block (spec section 1)."""

  def __init__(self, cin, mid, cout, stride=1, first_dilation=1, dilation=1):
    super().__init__()
    self.same_shape = cin == cout and stride == 1
    self.bn_branch2a = nn.BatchNorm2d(cin)
    self.conv_branch2a = _conv(cin, mid, 3, stride, first_dilation)
    self.bn_branch2b1 = nn.BatchNorm2d(mid)
    self.conv_branch2b1 = _conv(mid, cout, 3, 1, dilation)
    if not self.same_shape:
      self.conv_branch1 = _conv(cin, cout, 1, stride)

  def forward(self, x):
    a = F.relu(self.bn_branch2a(x))
    shortcut = x if self.same_shape else self.conv_branch1(a)
    r = self.conv_branch2b1(F.relu(self.bn_branch2b1(self.conv_branch2a(a))))
    return shortcut + r, a


class ResBlockBotRef(nn.Module):
  """Pre-activation bottleneck block with channel dropout (spec section 1)."""

  def __init__(self, cin, cout, dilation=1, dropout=0.):
    super().__init__()
    self.bn_branch2a = nn.BatchNorm2d(cin)
    self.conv_branch1 = _conv(cin, cout, 1)
    self.conv_branch2a = _conv(cin, cout // 4, 1)
    self.bn_branch2b1 = nn.BatchNorm2d(cout // 4)
    self.dropout_2b1 = nn.Dropout2d(dropout)
    self.conv_branch2b1 = _conv(cout // 4, cout // 2, 3, 1, dilation)
    self.bn_branch2b2 = nn.BatchNorm2d(cout // 2)
    self.dropout_2b2 = nn.Dropout2d(dropout)
    self.conv_branch2b2 = _conv(cout // 2, cout, 1)

  def forward(self, x):
    a = F.relu(self.bn_branch2a(x))
    r = self.dropout_2b1(F.relu(self.bn_branch2b1(self.conv_branch2a(a))))
    r = self.dropout_2b2(F.relu(self.bn_branch2b2(self.conv_branch2b1(r))))
    return self.conv_branch1(a) + self.conv_branch2b2(r), a


# (name, in, mid, out, stride, first_dilation, dilation) of the basic blocks, straight from the spec's table.
_BASIC = [('b2', 64, 128, 128, 2, 1, 1), ('b2_1', 128, 128, 128, 1, 1, 1), ('b2_2', 128, 128, 128, 1, 1, 1),
          ('b3', 128, 256, 256, 2, 1, 1), ('b3_1', 256, 256, 256, 1, 1, 1), ('b3_2', 256, 256, 256, 1, 1, 1),
          ('b4', 256, 512, 512, 2, 1, 1)] + [(f'b4_{i}', 512, 512, 512, 1, 1, 1) for i in range(1, 6)] + [
              ('b5', 512, 512, 1024, 1, 1, 2), ('b5_1', 1024, 512, 1024, 1, 2, 2), ('b5_2', 1024, 512, 1024, 1, 2, 2)]


class ResNet38Ref(nn.Module):
  """Wide ResNet-38, output stride 8; `forward_as_dict` gives conv3..conv6. BN stays in eval mode in train()."""

  def __init__(self, width_div=1):
    super().__init__()
    w = lambda c: _w(c, width_div)
    self.conv1a = _conv(3, w(64), 3)
    for name, cin, mid, cout, stride, fd, d in _BASIC:
      setattr(self, name, ResBlockRef(w(cin), w(mid), w(cout), stride, fd, d))
    self.b6 = ResBlockBotRef(w(1024), w(2048), dilation=4, dropout=0.3)
    self.b7 = ResBlockBotRef(w(2048), w(4096), dilation=4, dropout=0.5)
    self.bn7 = nn.BatchNorm2d(w(4096))
    self.not_training = [self.conv1a, self.b2, self.b2_1, self.b2_2]

  def forward_as_dict(self, x):
    x = self.conv1a(x)
    feats = {}
    for name, *_ in _BASIC:
      x, a = getattr(self, name)(x)
      if name == 'b4':
        feats['conv3'] = a
      elif name == 'b5':
        feats['conv4'] = a
    x, feats['conv5'] = self.b6(x)
    x, _ = self.b7(x)
    feats['conv6'] = F.relu(self.bn7(x))
    return feats

  def forward(self, x):
    return self.forward_as_dict(x)['conv6']

  def train(self, mode=True):
    """The original's quirk: BatchNorm always in eval mode (running stats), dropout follows `mode`."""
    super().train(mode)
    for m in self.modules():
      if isinstance(m, nn.BatchNorm2d):
        m.eval()
    return self


def normalized_fg_cam(cam):
  """Spec section 2 step 2 (no gradient)."""
  with torch.no_grad():
    n, c = cam.shape[:2]
    cd = F.relu(cam.detach())
    m = cd.view(n, c, -1).max(dim=-1)[0].view(n, c, 1, 1) + 1e-5
    cdn = F.relu(cd - 1e-5) / m
    fg_max = cdn[:, 1:].max(dim=1, keepdim=True)[0]
    fg = torch.where(cdn[:, 1:] < fg_max, torch.zeros_like(cdn[:, 1:]), cdn[:, 1:])
    return torch.cat([1 - fg_max, fg], dim=1)


def pcm(cdn, f):
  """Spec section 2 step 4: column-normalised feature affinity applied to the CAM."""
  n, c, h, w = f.shape
  cdn = F.interpolate(cdn, (h, w), mode='bilinear', align_corners=True).view(n, -1, h * w)
  g = f.view(n, c, h * w)
  g = g / (torch.norm(g, dim=1, keepdim=True) + 1e-5)
  aff = F.relu(torch.matmul(g.transpose(1, 2), g))
  aff = aff / (torch.sum(aff, dim=1, keepdim=True) + 1e-5)
  return torch.matmul(cdn, aff).view(n, -1, h, w)


class SEAMRef(ResNet38Ref):
  """SEAM net: forward(x) -> (cam, cam_rv), both (N, 21, H, W)."""

  def __init__(self, width_div=1, num_classes=21):
    super().__init__(width_div)
    w = lambda c: _w(c, width_div)
    self.dropout7 = nn.Dropout2d(0.5)
    self.fc8 = nn.Conv2d(w(4096), num_classes, 1, bias=False)
    self.f8_3 = nn.Conv2d(w(512), w(64), 1, bias=False)
    self.f8_4 = nn.Conv2d(w(1024), w(128), 1, bias=False)
    self.f9 = nn.Conv2d(3 + w(64) + w(128), w(192), 1, bias=False)
    nn.init.xavier_uniform_(self.fc8.weight)
    nn.init.kaiming_normal_(self.f8_3.weight)
    nn.init.kaiming_normal_(self.f8_4.weight)
    nn.init.xavier_uniform_(self.f9.weight, gain=4)
    self.from_scratch_layers = [self.fc8, self.f8_3, self.f8_4, self.f9]

  def forward(self, x):
    size = x.shape[2:]
    d = self.forward_as_dict(x)
    cam = self.fc8(self.dropout7(d['conv6']))
    h, w = cam.shape[2:]
    cdn = normalized_fg_cam(cam)
    f8_3 = F.relu(self.f8_3(d['conv4'].detach()))
    f8_4 = F.relu(self.f8_4(d['conv5'].detach()))
    xs = F.interpolate(x, (h, w), mode='bilinear', align_corners=True)
    f = self.f9(torch.cat([xs, f8_3, f8_4], dim=1))
    cam_rv = pcm(cdn, f)
    up = lambda t: F.interpolate(t, size, mode='bilinear', align_corners=True)
    return up(cam), up(cam_rv)


def pair_indices(h, w, radius):
  """(from (hf*wf,), to (P*hf*wf,)) flat indices of the affinity pairs on an (h, w) map (spec section 6)."""
  offsets = [(0, dx) for dx in range(1, radius)]
  offsets += [(dy, dx) for dy in range(1, radius) for dx in range(1 - radius, radius)
              if dy * dy + dx * dx < radius ** 2]
  full = np.arange(h * w).reshape(h, w)
  ch, cw = h - (radius - 1), w - 2 * (radius - 1)
  ind_from = full[:ch, radius - 1:radius - 1 + cw].reshape(-1)
  ind_to = np.concatenate([full[dy:dy + ch, radius - 1 + dx:radius - 1 + dx + cw].reshape(-1) for dy, dx in offsets])
  return torch.from_numpy(ind_from), torch.from_numpy(ind_to)


class AffinityRef(ResNet38Ref):
  """AffinityNet: forward(x) -> (features (N, 448, h, w), affinities (N, P, hf*wf))."""

  def __init__(self, width_div=1, radius=RADIUS):
    super().__init__(width_div)
    w = lambda c: _w(c, width_div)
    self.radius = radius
    self.f8_3 = nn.Conv2d(w(512), w(64), 1, bias=False)
    self.f8_4 = nn.Conv2d(w(1024), w(128), 1, bias=False)
    self.f8_5 = nn.Conv2d(w(4096), w(256), 1, bias=False)
    self.f9 = nn.Conv2d(w(64) + w(128) + w(256), w(448), 1, bias=False)
    for m in (self.f8_3, self.f8_4, self.f8_5):
      nn.init.kaiming_normal_(m.weight)
    nn.init.xavier_uniform_(self.f9.weight, gain=4)
    self.from_scratch_layers = [self.f8_3, self.f8_4, self.f8_5, self.f9]

  def features(self, x):
    d = self.forward_as_dict(x)
    f = torch.cat([F.elu(self.f8_3(d['conv4'])), F.elu(self.f8_4(d['conv5'])), F.elu(self.f8_5(d['conv6']))], 1)
    return F.elu(self.f9(f))

  def forward(self, x):
    x = self.features(x)
    h, w = x.shape[2:]
    return x, pair_affinity(x, self.radius if min(h, w) >= 2 * self.radius + 1 else (min(h, w) - 1) // 2)


def pair_affinity(x, radius):
  """(N, P, hf*wf) affinities exp(-mean_c |x_from - x_to|) of an (N, C, h, w) map, via flat index gathers."""
  n, c, h, w = x.shape
  ind_from, ind_to = pair_indices(h, w, radius)
  flat = x.reshape(n, c, -1)
  ff = torch.index_select(flat, 2, ind_from).unsqueeze(2)                     # (n, c, 1, hf*wf)
  ft = torch.index_select(flat, 2, ind_to).view(n, c, -1, ff.shape[3])       # (n, c, P, hf*wf)
  return torch.exp(-torch.mean(torch.abs(ft - ff), dim=1))


@torch.no_grad()
def randomize_(model, seed=0):
  """Random weights AND random BN running stats / affine, so a conversion mistake cannot hide behind defaults.

  Conv weights are N(0, 1/fan_in) (activations stay O(1) through the residual stack); BN scale U(0.5, 1.5),
  bias N(0, 0.1), running mean N(0, 0.1), running var U(0.5, 1.5).
  """
  g = torch.Generator().manual_seed(seed)
  for m in model.modules():
    if isinstance(m, nn.Conv2d):
      fan_in = m.weight[0].numel()
      m.weight.copy_(torch.randn(m.weight.shape, generator=g) / np.sqrt(fan_in))
    elif isinstance(m, nn.BatchNorm2d):
      n = m.num_features
      m.weight.copy_(torch.rand(n, generator=g) + 0.5)
      m.bias.copy_(torch.randn(n, generator=g) * 0.1)
      m.running_mean.copy_(torch.randn(n, generator=g) * 0.1)
      m.running_var.copy_(torch.rand(n, generator=g) + 0.5)
      m.num_batches_tracked.fill_(7)
  return model


def state_dict_numpy(model):
  return {k: v.detach().cpu().numpy() for k, v in model.state_dict().items()}
