"""Train AffinityNet on the CRF'd CAMs of the SEAM stage (SEAM_SPEC section 6).

  python train_aff.py --config=configs/voc12.py [--config.aff.init_weights=ilsvrc-cls_rna-a1_cls1000_ep-0001.params]

Checkpoints (automatic resume) and logs go to <workdir>/affinity, the final weights to <workdir>/affinity/export.
"""
from seam_jax import runner
from seam_jax.common import cli

cli.define_config()

if __name__ == '__main__':
  cli.run(runner.main('train_aff'))
