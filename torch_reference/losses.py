"""The original SEAM training losses in PyTorch (NCHW), written from SEAM_SPEC section 3: the reference that the
parity tests and the baseline benchmarks compare seam_jax.train.losses with. Never imported by the library."""
import torch
import torch.nn.functional as F


def t_max_norm(p, e=1e-5):
  n, c = p.shape[:2]
  p = F.relu(p)
  mx = torch.max(p.view(n, c, -1), dim=-1)[0].view(n, c, 1, 1)
  mn = torch.min(p.view(n, c, -1), dim=-1)[0].view(n, c, 1, 1)
  return F.relu(p - mn - e) / (mx - mn + e)


def t_amp(x):
  n, _, h, w = x.shape
  k = h * w // 4
  m = torch.max(x, dim=1)[0]
  y = torch.topk(m.reshape(n, -1), k=k, dim=-1, largest=False)[0]
  return torch.sum(F.relu(y)) / (k * n)


def t_onehot(x):
  x = x.clone()
  fg = x[:, 1:]
  mx = torch.max(fg, dim=1, keepdim=True)[0]
  x[:, 1:] = torch.where(fg != mx, torch.zeros_like(fg), fg)
  return x


def t_topk_mean(x, ratio):
  n, c, h, w = x.shape
  return torch.mean(torch.topk(x.reshape(n, -1), k=int(c * h * w * ratio), dim=-1)[0])


def t_seam_loss(cam1, rv1, cam2, rv2, label, scale, ratio=0.2):
  """The original training step's loss, in-place background assignment included."""
  lab = label[:, :, None, None]
  up = lambda t: F.interpolate(t, scale_factor=scale, mode='bilinear', align_corners=True)
  p1 = F.adaptive_avg_pool2d(cam1, (1, 1))
  p2 = F.adaptive_avg_pool2d(cam2, (1, 1))
  min1 = t_amp((rv1 * lab)[:, 1:])
  min2 = t_amp((rv2 * lab)[:, 1:])
  cam1 = up(t_max_norm(cam1)) * lab
  rv1 = up(t_max_norm(rv1)) * lab
  cam2 = t_max_norm(cam2) * lab
  rv2 = t_max_norm(rv2) * lab
  cls1 = F.multilabel_soft_margin_loss(p1[:, 1:], lab[:, 1:])
  cls2 = F.multilabel_soft_margin_loss(p2[:, 1:], lab[:, 1:])
  er = torch.mean(torch.abs(cam1[:, 1:] - cam2[:, 1:]))
  cam1[:, 0] = 1 - torch.max(cam1[:, 1:], dim=1)[0]
  cam2[:, 0] = 1 - torch.max(cam2[:, 1:], dim=1)[0]
  ecr = (t_topk_mean(torch.abs(t_onehot(cam2.detach()) - rv1), ratio) +
         t_topk_mean(torch.abs(t_onehot(cam1.detach()) - rv2), ratio))
  cls = (cls1 + cls2) / 2 + (min1 + min2) / 2
  return cls + er + ecr, {'cls': cls, 'er': er, 'ecr': ecr}


def t_affinity_loss(aff, bg_pos, fg_pos, neg):
  """The original AffinityNet loss (SEAM_SPEC section 6) over the whole batch: aff (N, P, hf*wf) and the three
  float 0/1 pair masks of the same shape."""
  cnt = [m.sum() + 1e-5 for m in (bg_pos, fg_pos, neg)]
  bg = torch.sum(-bg_pos * torch.log(aff + 1e-5)) / cnt[0]
  fg = torch.sum(-fg_pos * torch.log(aff + 1e-5)) / cnt[1]
  ng = torch.sum(-neg * torch.log(1. + 1e-5 - aff)) / cnt[2]
  return bg / 4 + fg / 4 + ng / 2
