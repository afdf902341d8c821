"""The Markdown tables of a benchmark run (benchmarks/run.py) from its JSON document."""

NAMES = {'seam': 'SEAM train step', 'affinity': 'AffinityNet train step', 'deeplab': 'segmentation train step',
         'cam': 'CAM inference (multi-scale + flip)'}


def _f(x, fmt='.3g'):
  return '–' if x is None else format(x, fmt)


def _row(cells):
  return '| ' + ' | '.join(str(c) for c in cells) + ' |'


def _table(header, rows):
  return '\n'.join([_row(header), _row(['---'] * len(header))] + [_row(r) for r in rows])


def _ok(d):
  return d is not None and 'error' not in d


def _speed_rows(res, peak):
  """One row per network benchmark: seconds per step/image, speed-up, compile time, FLOPs, use of the peak, memory."""
  rows = []
  for kind in ('seam', 'affinity', 'deeplab', 'cam'):
    key = f'train/{kind}' if kind != 'cam' else 'cam'
    f32, bf16, pt = res.get(f'{key}/jax/float32'), res.get(f'{key}/jax/bfloat16'), res.get(f'{key}/torch')
    if not any(_ok(d) for d in (f32, bf16, pt)):
      continue
    per_img = lambda d: d['seconds'] / d.get('batch', 1) if _ok(d) else None
    ratio = per_img(pt) / per_img(f32) if _ok(pt) and _ok(f32) else None
    flops = f32.get('flops') / f32['batch'] if _ok(f32) and f32.get('flops') else None
    use = lambda d, p: f'{100 * flops / per_img(d) / p:.0f} %' if flops and _ok(d) and p else '–'
    compile_s = f32.get('compile_s', f32.get('first_pass_s')) if _ok(f32) else None
    mem = lambda d: _f(d.get('device_peak_mb') or d.get('peak_rss_mb'), '.0f') if _ok(d) else '–'
    rows.append([NAMES[kind], _f(per_img(f32)), _f(per_img(bf16)), _f(per_img(pt)), _f(ratio, '.2f'),
                 _f(compile_s, '.1f'), _f(flops and flops / 1e9, '.3g'), use(f32, peak.get('float32')),
                 use(bf16, peak.get('bfloat16')), use(pt, peak.get('float32')),
                 f'{mem(f32)} / {mem(pt)}', _f(f32.get('parity_rel') if _ok(f32) else None, '.1e')])
  return rows


def markdown(doc):
  """The run's tables: networks (JAX float32, bfloat16, PyTorch), random walk, CRF, input pipeline."""
  res, size = doc['results'], doc['size']
  m = res.get('machine', {})
  peak = {k.split('/')[1]: v['flops_per_s'] for k, v in res.items() if k.startswith('peak/') and _ok(v)}
  out = [f"Machine: {m.get('cpu')} ({m.get('cores')} cores), JAX {m.get('jax')} on {m.get('jax_devices')} "
         f"({m.get('jax_backend')}), PyTorch {m.get('torch')} on {m.get('torch_device')}; load average at start "
         f"{_f(m.get('load_avg_1min'), '.1f')}. Size `{size['name']}`: width_div {size['width_div']}, crop "
         f"{size['crop']}, batch {size['batch']}, images {size['image_hw'][0]}x{size['image_hw'][1]}, CAM scales "
         f"{tuple(size['scales'])} + flips. Measured matmul peak: "
         + ', '.join(f'{k} {v / 1e9:.0f} GFLOP/s' for k, v in peak.items())
         + '. Commands: ' + '; '.join(f'`{c}`' for c in doc.get('commands', [doc.get('command')]))
         + f" ({doc['seconds'] / 60:.0f} min).", '']
  out += [_table(['benchmark', 'JAX f32 s/img', 'JAX bf16 s/img', 'PyTorch s/img', 'PyTorch / JAX f32',
                  'JAX compile s', 'GFLOP/img', 'JAX f32 % peak', 'JAX bf16 % peak', 'PyTorch % peak',
                  'peak MB JAX / PyTorch', 'JAX vs PyTorch rel. diff'], _speed_rows(res, peak)), '']
  if _ok(res.get('cam/difference')) and res['cam/difference']['max_abs'] is not None:
    out += [f"CAM files JAX vs PyTorch: largest difference {res['cam/difference']['max_abs']:.1e} "
            '(values in [0, 1]).', '']
  rw = res.get('rw')
  if _ok(rw):
    base = rw['numpy_dense']
    out += [f"Random walk, {size['image_hw'][0]}x{size['image_hw'][1]} image ({rw['nodes']} nodes, radius "
            f"{rw['radius']}, logt 6), affinities given:", '',
            _table(['implementation', 's/image', 'speed-up vs NumPy dense', 'labels equal to NumPy sparse'],
                   [[k, _f(rw[k]), _f(base / rw[k], '.1f'), f"{100 * rw['agreement'][k]:.2f} %"]
                    for k in ('numpy_dense', 'torch_dense', 'numpy_sparse', 'jax_sparse', 'jax_dense')]), '']
  crf = res.get('crf')
  if _ok(crf):
    out += [f"Dense CRF ({crf['hw'][0]}x{crf['hw'][1]}, 2 classes, 10 iterations): {crf['img_per_s_1']:.2f} img/s "
            f"in one process, {crf['img_per_s_all']:.2f} img/s over {crf['workers']} processes.", '']
  loader = [(k.split('/')[1], v) for k, v in sorted(res.items()) if k.startswith('loader/') and k.count('/') == 2]
  if loader:
    out += ['SEAM input pipeline (decode, resize, flip; host: + jitter, normalise, crop):', '',
            _table(['augmentation', 'worker processes', 'img/s', 'img/s per core', 'MB per batch'],
                   [[a, v.get('workers'), _f(v.get('img_per_s'), '.1f'), _f(v.get('img_per_s_per_core'), '.1f'),
                     _f(v.get('batch_bytes', 0) / 2 ** 20, '.3g')] if _ok(v) else [a, '–', v.get('error'), '', '']
                    for a, v in loader]), '']
  half = res.get('loader/device_half')
  if _ok(half):
    out += [f"Device half of the augmentation (jitter, normalise, crop) in the step: "
            f"{1e3 * half['seconds_per_image']:.1f} ms per image on the JAX device.", '']
  tp = res.get('throughput')
  if _ok(tp):
    out += [f"SEAM training with the real loader ({tp['workers']} workers, device augmentation): "
            f"{tp['real_img_per_s']:.3g} img/s; with a synthetic batch already on the device: "
            f"{tp['synthetic_img_per_s']:.3g} img/s ({100 * tp['real_over_synthetic']:.0f} %).", '']
  errors = [f'- `{k}`: {v["error"]}' for k, v in res.items() if isinstance(v, dict) and 'error' in v]
  if errors:
    out += ['Failed measurements:', ''] + errors + ['']
  return '\n'.join(out)
