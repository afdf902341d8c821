"""Random walk with the trained AffinityNet: CAMs -> label PNGs (SEAM_SPEC section 7).

  python random_walk.py --config=configs/voc12.py [--config.rw.backend=jax] [--config.rw.list=val]
"""
from seam_jax import runner
from seam_jax.common import cli

cli.define_config()

if __name__ == '__main__':
  cli.run(runner.main('rw'))
