"""PyTorch reference of the segmentation retrain, written from RETRAIN_SPEC sections 1, 3 and 4 (test and benchmark
code only).

`DeepLabRef` is SSC's `deeplabv1` on ResNet38 with the original's state-dict names (`backbone.b4_3.bn_branch2a.
running_mean`, `conv_fov.weight`, `cls_conv.bias`, ...). As in the original's training (QUIRK Q1) every BatchNorm
runs in training mode with momentum 0.0003; `data_parallel_forward` reproduces nn.DataParallel with plain BatchNorm2d
(each chunk of `group` images normalised by its own statistics, only replica 0's running statistics kept).
`width_div` narrows every channel count exactly like the Flax model.
"""
import cv2
import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from torch_reference.models import ResNet38Ref, _w

BN_MOMENTUM = 0.0003
NUM_CLASSES = 21


class BackboneRef(ResNet38Ref):
  """ResNet38Ref whose BatchNorm follows the module's mode: the retrain never calls the backbone's freezing train()
  override (QUIRK Q1), so in training every BN uses batch statistics."""

  def train(self, mode=True):
    return nn.Module.train(self, mode)


class DeepLabRef(nn.Module):
  """forward(x) -> (N, 21, H, W) logits upsampled (bilinear, align_corners=True) to the input size."""

  def __init__(self, width_div=1, num_classes=NUM_CLASSES):
    super().__init__()
    w = lambda c: _w(c, width_div)
    self.backbone = BackboneRef(width_div)
    self.conv_fov = nn.Conv2d(w(4096), w(512), 3, 1, padding=12, dilation=12, bias=False)
    self.bn_fov = nn.BatchNorm2d(w(512), momentum=BN_MOMENTUM)
    self.conv_fov2 = nn.Conv2d(w(512), w(512), 1, 1, padding=0, bias=False)
    self.bn_fov2 = nn.BatchNorm2d(w(512), momentum=BN_MOMENTUM)
    self.dropout1 = nn.Dropout(0.5)
    self.cls_conv = nn.Conv2d(w(512), num_classes, 1, 1, padding=0)
    self.from_scratch_layers = [self.conv_fov, self.conv_fov2, self.cls_conv]
    for m in self.from_scratch_layers:
      nn.init.kaiming_normal_(m.weight, mode='fan_out', nonlinearity='relu')
    for m in self.modules():
      if isinstance(m, nn.BatchNorm2d):
        m.momentum = BN_MOMENTUM

  def forward(self, x, upsample=True):
    h, w = x.shape[2:]
    f = F.relu(self.bn_fov(self.conv_fov(self.backbone(x))))
    f = self.dropout1(F.relu(self.bn_fov2(self.conv_fov2(f))))
    out = self.cls_conv(f)
    return F.interpolate(out, (h, w), mode='bilinear', align_corners=True) if upsample else out

  def get_parameter_groups(self):
    """The original's four SGD groups: conv weights (backbone), conv biases (backbone, empty), head conv weights,
    head conv biases. BatchNorm parameters are in none."""
    groups = ([], [], [], [])
    for m in self.modules():
      if isinstance(m, nn.Conv2d):
        new = m in self.from_scratch_layers
        groups[2 if new else 0].append(m.weight)
        if m.bias is not None:
          groups[3 if new else 1].append(m.bias)
    return groups


def train_without_dropout(model):
  """Training mode (BN on batch statistics) with every dropout off: deterministic training-mode forwards."""
  model.train()
  for m in model.modules():
    if isinstance(m, (nn.Dropout, nn.Dropout2d)):
      m.eval()
  return model


def data_parallel_forward(model, x, group):
  """nn.DataParallel over len(x) / group replicas with plain BatchNorm2d: chunk k of `group` images runs on replica
  k with its own batch statistics; parameters are shared (gradients sum over chunks), the running statistics of
  replicas k > 0 are thrown away (DataParallel keeps the module's own, replica 0's)."""
  chunks = x.split(group)
  params = dict(model.named_parameters())
  outs = [model(chunks[0])]
  for c in chunks[1:]:
    buffers = {k: v.clone() for k, v in model.named_buffers()}
    outs.append(torch.func.functional_call(model, {**params, **buffers}, (c,)))
  return torch.cat(outs)


def make_sgd(model, lr=0.001, momentum=0.9, weight_decay=5e-4):
  """The original's optimizer: SGD over the four groups with lr x1, x2, x10, x20 and weight decay on 0 and 2."""
  g = model.get_parameter_groups()
  return torch.optim.SGD([{'params': g[0], 'lr': lr, 'weight_decay': weight_decay},
                          {'params': g[1], 'lr': 2 * lr, 'weight_decay': 0},
                          {'params': g[2], 'lr': 10 * lr, 'weight_decay': weight_decay},
                          {'params': g[3], 'lr': 20 * lr, 'weight_decay': 0}],
                         momentum=momentum, weight_decay=weight_decay)


def adjust_lr(optimizer, itr, max_itr, lr_init=0.001, power=0.9):
  """The original's poly schedule, set before every step (QUIRK Q5: denominator max_itr + 1)."""
  now = lr_init * (1 - itr / (max_itr + 1)) ** power
  for group, mult in zip(optimizer.param_groups, (1, 2, 10, 20)):
    group['lr'] = mult * now
  return now


def train_step(model, optimizer, image, label, itr, max_itr, group, lr_init=0.001):
  """One step of the original's train.py: poly lr, DataParallel forward, CrossEntropyLoss(ignore_index=255) over
  the whole batch, backward, SGD. Returns the loss."""
  adjust_lr(optimizer, itr, max_itr, lr_init)
  optimizer.zero_grad()
  loss = F.cross_entropy(data_parallel_forward(model, image, group), label, ignore_index=255)
  loss.backward()
  optimizer.step()
  return float(loss.detach())


@torch.no_grad()
def multiscale_logits(model, image, scales, flip=True):
  """The original's test fusion (SSC test.py) for one normalised float32 HWC image: per scale the cv2 INTER_CUBIC
  resize (fx = fy = s) of the normalised image, the net on it and on its mirror; every output bilinearly resized
  (align_corners=True) to H x W, the mirror's un-flipped; the mean of the logit maps -> (21, H, W)."""
  h, w = image.shape[:2]
  outs = []
  for s in scales:
    v = cv2.resize(image, None, fx=s, fy=s, interpolation=cv2.INTER_CUBIC)
    x = torch.from_numpy(np.ascontiguousarray(v.transpose(2, 0, 1))[None])
    up = lambda t: F.interpolate(model(t), (h, w), mode='bilinear', align_corners=True)
    outs.append(up(x))
    if flip:
      outs.append(torch.flip(up(torch.flip(x, [3])), [3]))
  return torch.mean(torch.cat(outs), dim=0)
