"""The whole SEAM pipeline, stage after stage, on one config (each stage also has its own entry point).

  python pipeline.py --config=configs/demo.py                       # demo set generated first
  python pipeline.py --config=configs/voc12.py --stages=infer,eval_cam

Stages: demo (demo configs only), prepare, train, infer (CAMs), crf, eval_cam, eval_crf (the la/ha CRF maps),
train_aff, rw, eval_rw. Each stage resumes or skips work already done, so re-running after an interruption continues
where it stopped.
"""
import json
import os

from absl import flags, logging

from seam_jax import cli

cli.define_config()
flags.DEFINE_list('stages', None, 'stages to run, in order (default: all; `demo` only for configs with demo fields)')
FLAGS = flags.FLAGS
STAGES = ('demo', 'prepare', 'train', 'infer', 'crf', 'eval_cam', 'eval_crf', 'train_aff', 'rw', 'eval_rw')


def eval_config(config, pred_dir, pred_type, name):
  c = config.copy_and_resolve_references()
  with c.unlocked():
    c.eval.pred_dir, c.eval.pred_type = pred_dir, pred_type
    c.eval.list = config.rw.list if pred_type == 'png' else config.eval.list
    c.eval.out_dir = os.path.join(config.eval.out_dir, name)
  return c


def brief(res):
  return {k: res[k] for k in ('miou', 'miou_present', 'best_threshold') if k in res}


def run_stage(stage, config):
  """Run one stage; returns a small summary for the final report."""
  # Imports per stage: a stage pays only for what it uses.
  # pylint: disable=g-import-not-at-top
  if stage == 'demo':
    from seam_jax import prepare
    return prepare.make_demo(config, workers=os.cpu_count())
  if stage == 'prepare':
    from seam_jax import prepare
    return prepare.prepare(config.data, workers=os.cpu_count())
  if stage in ('train', 'train_aff'):
    from seam_jax import trainer
    if stage == 'train':
      from seam_jax.seam_task import seam_task as make_task
    else:
      from seam_jax.affinity_task import affinity_task as make_task
    trainer.train(config, make_task(config))
    return None
  if stage == 'infer':
    from seam_jax import infer_cam
    return infer_cam.run_inference(config)
  if stage == 'crf':
    from seam_jax import crf
    return crf.run_crf(config)
  if stage in ('eval_cam', 'eval_rw'):
    from seam_jax import evaluation
    c = (eval_config(config, config.infer.cam_dir, 'npy', 'cam') if stage == 'eval_cam' else
         eval_config(config, config.rw.out_dir, 'png', 'rw'))
    return brief(evaluation.evaluate(c))
  if stage == 'eval_crf':
    from seam_jax import crf, evaluation
    return {f'alpha_{a}': brief(evaluation.evaluate(eval_config(config, crf.alpha_dir(config.infer.crf_dir, a), 'crf',
                                                                f'crf_{a}')))
            for a in config.infer.crf_alphas}
  if stage == 'rw':
    from seam_jax import random_walk
    return random_walk.run(config)
  raise ValueError(stage)


def main(argv):
  del argv
  config = FLAGS.config
  stages = FLAGS.stages or [s for s in STAGES if s != 'demo' or 'demo' in config]
  unknown = [s for s in stages if s not in STAGES]
  if unknown:
    raise cli.DataError(f'unknown stage(s) {unknown}; choose from {list(STAGES)}')
  report = {}
  for stage in stages:
    logging.info('=== stage %s ===', stage)
    out = run_stage(stage, config)
    if stage.startswith('eval'):
      report[stage] = out
  logging.info('pipeline done: %s', json.dumps(report))
  print(json.dumps(report, indent=1, default=str))


if __name__ == '__main__':
  cli.run(main)
