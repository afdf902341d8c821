"""Evaluate predictions against the ground truth (SEAM_SPEC 5) through the pipeline's evaluation stages.

  python evaluate.py --config=configs/voc12.py                                  # the CAMs: stage eval_cam
  python evaluate.py --config=configs/voc12.py --config.eval.pred_type=png --config.eval.pred_dir=work_dirs/voc12/rw

Without eval.pred_dir it runs eval_cam (the run's CAMs, into <workdir>/eval/cam/); with it, eval_custom (those
predictions of eval.pred_type, into <workdir>/eval/custom/). Like every stage it skips when its results are those of
the config and inputs (--force reruns it).
"""
from absl import flags

from seam_jax import runner
from seam_jax.common import cli

cli.define_config()


def main(argv):
  runner.main('eval_custom' if flags.FLAGS.config.eval.pred_dir else 'eval_cam')(argv)


if __name__ == '__main__':
  cli.run(main)
