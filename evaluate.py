"""Evaluate CAMs (mIoU over background thresholds) or label PNGs against VOC ground truth (SEAM_SPEC 5).

  python evaluate.py --config=configs/voc12.py                                  # CAMs of infer.cam_dir, train
  python evaluate.py --config=configs/voc12.py --config.eval.pred_type=png --config.eval.pred_dir=work_dirs/voc12/rw
"""
from absl import flags

from seam_jax.common import cli
from seam_jax.infer import evaluation

cli.define_config()


def main(argv):
  del argv
  evaluation.evaluate(flags.FLAGS.config)


if __name__ == '__main__':
  cli.run(main)
