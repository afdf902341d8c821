"""The whole SEAM pipeline, stage after stage, on one config: the same as `python -m seam_jax` (seam_jax/__main__.py).

  python pipeline.py --config=configs/demo.py                                  # the demo set is generated first
  python pipeline.py --config=configs/voc12.py --stages=infer..eval_rw         # names, comma lists, ranges a..b
  python pipeline.py --config=configs/demo.py --config.pipeline.compare_baseline=True   # + the plain-CAM baseline

Stages (seam_jax.stages): demo (demo configs only), prepare, train, infer (CAMs), crf, eval_cam, eval_crf, train_aff,
rw, eval_rw. A stage whose outputs are complete is skipped (--force reruns it); an interrupted one resumes. Ends with
a table of every stage (time, mIoU) and <workdir>/report/{summary.json, report.html}.
"""
from seam_jax import __main__ as seam_main

if __name__ == '__main__':
  seam_main.run()
