"""`python -m seam_jax STAGES --config=...`: run pipeline stages (seam_jax.stages) on one config.

  python -m seam_jax --config=configs/demo.py                   # every stage (the same as python pipeline.py)
  python -m seam_jax infer..rw --config=configs/voc12.py        # a range; also names, comma lists: train,eval_cam
  python -m seam_jax eval_cam --config=configs/voc12.py --force # rerun although its outputs are complete

A stage whose outputs are complete is skipped; one that is interrupted resumes when run again. The run ends with a
table of the stages (wall time, mIoU) and writes <workdir>/report/{summary.json, report.html}. With
`--config.pipeline.compare_baseline=True` the stages from train to eval_rw run a second time with the plain-CAM
baseline (train.method='cam') in <workdir>/baseline, and the report sets the two side by side.
"""
from absl import flags

from seam_jax import report, stages
from seam_jax.common import cli, distributed, errors

cli.define_config()
flags.DEFINE_string('stages', None, 'stages to run (or as the positional argument): names, comma lists, ranges '
                    'a..b; default all')
flags.DEFINE_bool('force', False, 'run the selected stages even where their outputs are complete')
flags.DEFINE_bool('report', True, 'write <workdir>/report/{summary.json,report.html} at the end')
FLAGS = flags.FLAGS


def main(argv):
  if len(argv) > 2 or (len(argv) == 2 and FLAGS.stages is not None):
    raise errors.DataError(f'give the stages once, as one argument or --stages (got {argv[1:]}, '
                           f'--stages={FLAGS.stages})')
  config = FLAGS.config
  names = stages.select(argv[1] if len(argv) == 2 else (FLAGS.stages or 'all'), config)
  records = stages.run_stages(config, names, FLAGS.force)
  if config.pipeline.compare_baseline and stages.baseline_stages(names):
    records += stages.run_stages(stages.baseline_config(config), stages.baseline_stages(names), FLAGS.force,
                                 label='baseline/')
  print(report.stage_table(config, records), flush=True)
  if FLAGS.report and distributed.is_main():
    print(f'report: {report.write(config, records)}', flush=True)


def run():
  cli.run(main)


if __name__ == '__main__':
  run()
