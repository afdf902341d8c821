"""CAM inference with the trained SEAM net, then the dense CRF score maps AffinityNet learns from (SEAM_SPEC 4).

  python infer.py --config=configs/voc12.py [--config.infer.list=train] [--steps=cam] [--force]
  python infer.py --config=configs/demo.py --config.infer.crf_alphas='()'   # CAMs only
"""
from absl import flags

from seam_jax import runner
from seam_jax.common import cli

cli.define_config()
flags.DEFINE_multi_enum('steps', ['cam', 'crf'], ['cam', 'crf'], 'which parts to run, in order')
STAGE_OF = {'cam': 'infer', 'crf': 'crf'}


def main(argv):
  runner.main(*[STAGE_OF[s] for s in flags.FLAGS.steps])(argv)


if __name__ == '__main__':
  cli.run(main)
