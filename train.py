"""Train SEAM (SEAM_SPEC section 3) data-parallel over every local device, or over a multi-host pod.

  python train.py --config=configs/voc12.py --config.model.init_weights=ilsvrc-cls_rna-a1_cls1000_ep-0001.params
  python train.py --config=configs/demo.py
  python train.py --multihost ...     # TPU pod / multi-node GPU: every host runs this (or set SEAM_MULTIHOST=1)

Checkpoints (automatic resume) and logs (TensorBoard, metrics.jsonl) go to <workdir>/seam, the final weights to
<workdir>/seam/export.
"""
import os

from absl import flags
import jax

from seam_jax import cli
from seam_jax import trainer
from seam_jax.seam_task import seam_task

cli.define_config()
flags.DEFINE_bool('multihost', False, 'call jax.distributed.initialize() first (also: env SEAM_MULTIHOST=1)')


def main(argv):
  del argv
  if flags.FLAGS.multihost or os.environ.get('SEAM_MULTIHOST', '') not in ('', '0'):
    jax.distributed.initialize()
  config = flags.FLAGS.config
  trainer.train(config, seam_task(config))


if __name__ == '__main__':
  cli.run(main)
