"""`python -m seam_jax STAGES --config=...`: run pipeline stages (seam_jax.stages) on one config.

  python -m seam_jax --config=configs/demo.py                   # every stage (the same as python pipeline.py)
  python -m seam_jax infer..rw --config=configs/voc12.py        # a range; also names, comma lists: train,eval_cam
  python -m seam_jax eval_cam --config=configs/voc12.py --force # rerun although its outputs are complete
  python -m seam_jax status --config=configs/voc12.py           # each stage: complete / incomplete / stale (why) /
                                                                # missing; runs nothing

A stage whose outputs are those of its config and inputs is skipped; one that is interrupted resumes when run
again; one whose config fields or inputs changed reruns from scratch and says why (seam_jax.runner). The run ends with a
table of the stages (wall time, mIoU) and writes <workdir>/report/{summary.json, report.html}. With
`--config.pipeline.compare_baseline=True` the stages from train to eval_rw run a second time with the plain-CAM
baseline (train.method='cam') in <workdir>/baseline, and the report sets the two side by side.
"""
from absl import flags

from seam_jax import report, runner, stages
from seam_jax.common import cli, distributed, errors

cli.define_config()
flags.DEFINE_string('stages', None, 'stages to run (or as the positional argument): names, comma lists, ranges '
                    'a..b; default all')
flags.DEFINE_bool('report', True, 'write <workdir>/report/{summary.json,report.html} at the end')
FLAGS = flags.FLAGS


def main(argv):
  args = argv[1:]
  show_status = args[:1] == ['status']
  args = args[1:] if show_status else args
  if len(args) > 1 or (args and FLAGS.stages is not None):
    raise errors.DataError(f'give the stages once, as one argument or --stages (got {argv[1:]}, '
                           f'--stages={FLAGS.stages})')
  config = FLAGS.config
  names = stages.select(args[0] if args else (FLAGS.stages or 'all'), config)
  if show_status:
    print('\n'.join(runner.status_lines(config, names)))
    if config.pipeline.compare_baseline and stages.baseline_stages(names):
      print('\n'.join('baseline/' + l for l in runner.status_lines(stages.baseline_config(config),
                                                                   stages.baseline_stages(names))))
    return
  records = runner.pipeline(config, names, FLAGS.force)
  print(report.stage_table(config, records), flush=True)
  if FLAGS.report and distributed.is_main():
    print(f'report: {report.write(config, records)}', flush=True)


def run():
  cli.run(main)


if __name__ == '__main__':
  run()
