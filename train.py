"""Train SEAM (SEAM_SPEC section 3) data-parallel over every local device, or over a multi-host pod.

  python train.py --config=configs/voc12.py --config.model.init_weights=ilsvrc-cls_rna-a1_cls1000_ep-0001.params
  python train.py --config=configs/demo.py
  python train.py --config=configs/demo.py --config.train.method=cam   # the plain-CAM baseline
  python train.py --multihost ...     # one process per host: every host runs this (README "Running on many hosts")

Checkpoints (automatic resume) and logs (TensorBoard, metrics.jsonl) go to <workdir>/seam, the final weights to
<workdir>/seam/export.
"""
from seam_jax import runner
from seam_jax.common import cli

cli.define_config()

if __name__ == '__main__':
  cli.run(runner.main('train'))
