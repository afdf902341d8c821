"""Prepare lists and image-level labels from a VOC2012 folder (optionally generating the demo set first).

  python prepare.py --config=configs/voc12.py --config.data.voc_root=data/VOC2012 --config.data.sbd_root=data/SBD
  python prepare.py --config=configs/demo.py --demo
"""
from absl import flags

from seam_jax import runner
from seam_jax.common import cli

cli.define_config()
flags.DEFINE_bool('demo', False, 'first generate the demo set at config.data.voc_root from config.demo')
flags.DEFINE_bool('force_demo', False, 'with --demo: regenerate the demo set even if one is there (= --force)')
flags.DEFINE_integer('workers', 0, 'process pool size for the file checks (0: all cores)')
FLAGS = flags.FLAGS


def main(argv):
  del argv
  names = ['demo', 'prepare'] if FLAGS.demo else ['prepare']
  runner.pipeline(FLAGS.config, names, force=FLAGS.force or FLAGS.force_demo,
                  options={n: {'workers': FLAGS.workers} for n in names})


if __name__ == '__main__':
  cli.run(main)
