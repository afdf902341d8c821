"""Train AffinityNet on the CRF'd CAMs of the SEAM stage (SEAM_SPEC section 6).

  python train_aff.py --config=configs/voc12.py [--config.aff.init_weights=ilsvrc-cls_rna-a1_cls1000_ep-0001.params]

Checkpoints (automatic resume) and logs go to <workdir>/affinity, the final weights to <workdir>/affinity/export.
"""
from absl import flags

from seam_jax import cli
from seam_jax import trainer
from seam_jax.affinity_task import affinity_task

cli.define_config()


def main(argv):
  del argv
  config = flags.FLAGS.config
  trainer.train(config, affinity_task(config))


if __name__ == '__main__':
  cli.run(main)
