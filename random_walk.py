"""Random walk with the trained AffinityNet: CAMs -> label PNGs (SEAM_SPEC section 7).

  python random_walk.py --config=configs/voc12.py [--config.rw.backend=jax] [--config.rw.list=val]
"""
from absl import flags

from seam_jax import cli
from seam_jax import random_walk

cli.define_config()


def main(argv):
  del argv
  random_walk.run(flags.FLAGS.config)


if __name__ == '__main__':
  cli.run(main)
