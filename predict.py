"""Segment any image files with the trained segmentation net: label PNGs and side-by-side overlays.

  python predict.py --config=configs/voc12.py --input=photos/ --input=more.jpg [--output=out/] [--weights=model.pth]

Inputs: image files, folders and .txt lists of paths. Weights: --weights, else seg.checkpoint, else this run's
segmentation export (an export folder or the authors' released deeplabv1 ResNet38 .pth). Test-time settings
(scales, flip, CRF, max_side: the longer side large photos are tested at, for bounded memory; labels and overlays
keep the original size) come from config.seg. A file that cannot be read is reported on one line and the others still
complete; the exit code is 1 if any failed.
"""
import sys

from absl import flags

from seam_jax.common import cli

cli.define_config()
flags.DEFINE_multi_string('input', None, 'image file, folder or .txt list (repeatable)', required=True)
flags.DEFINE_string('output', None, 'output folder (default <workdir>/predict, seam_jax.layout.predict_dir)')
flags.DEFINE_string('weights', None, 'export folder or .pth (default seg.checkpoint, then <workdir>/seg/export)')
FLAGS = flags.FLAGS


def main(argv):
  del argv
  from seam_jax.infer import predict  # pylint: disable=g-import-not-at-top  (JAX only after the flags parse)
  result = predict.run_predict(FLAGS.config, FLAGS.input, FLAGS.output, FLAGS.weights)
  for _, message in result['failed']:
    print(f'error: {message}', file=sys.stderr)
  print(f'predict: {len(result["written"])} images segmented, {len(result["failed"])} failed')
  if result['failed']:
    sys.exit(1)


if __name__ == '__main__':
  cli.run(main)
