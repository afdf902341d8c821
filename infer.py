"""CAM inference with the trained SEAM net, then the dense CRF score maps AffinityNet learns from (SEAM_SPEC 4).

  python infer.py --config=configs/voc12.py [--config.infer.list=train] [--steps=cam] [--config.infer.force]
  python infer.py --config=configs/demo.py --config.infer.crf_alphas='()'   # CAMs only
"""
from absl import flags

from seam_jax import cli

cli.define_config()
flags.DEFINE_multi_enum('steps', ['cam', 'crf'], ['cam', 'crf'], 'which parts to run, in order')
FLAGS = flags.FLAGS


def main(argv):
  del argv
  config = FLAGS.config
  if 'cam' in FLAGS.steps:
    from seam_jax import infer_cam  # pylint: disable=g-import-not-at-top (no JAX for a CRF-only run)
    infer_cam.run_inference(config)
  if 'crf' in FLAGS.steps:
    from seam_jax import crf  # pylint: disable=g-import-not-at-top
    crf.run_crf(config)


if __name__ == '__main__':
  cli.run(main)
