"""Full PASCAL VOC 2012 (+SBD) recipe of the original SEAM release (../shared/SEAM_SPEC.md).

Every stage reads this one config; override any field on the command line, e.g.
`python train.py --config=configs/voc12.py --config.train.batch_size=4`.
"""
import ml_collections


def get_config():
  c = ml_collections.ConfigDict()
  c.seed = 0
  c.workdir = 'work_dirs/voc12'  # all stage outputs go below this folder

  # Data (section 8). `voc_root` holds JPEGImages/, SegmentationClass(Aug)/, Annotations/, ImageSets/.
  c.data = ml_collections.ConfigDict()
  c.data.voc_root = 'data/VOC2012'
  c.data.sbd_root = ''              # optional SBD `dataset/` folder (cls/*.mat, train.txt, val.txt)
  c.data.list_dir = 'work_dirs/voc12/lists'   # prepare writes train_aug.txt, train.txt, val.txt here
  c.data.cls_labels = 'work_dirs/voc12/lists/cls_labels.npy'
  c.data.label_source = 'xml'       # 'xml' (original) or 'masks' (SegmentationClassAug)
  c.data.train_list = 'train_aug'   # name in list_dir, or a path to a list file
  c.data.crop_size = 448
  c.data.resize_long = (448, 768)   # inclusive range for the random long side
  c.data.jitter = (0.3, 0.3, 0.3, 0.1)  # brightness, contrast, saturation, hue
  c.data.num_workers = 4
  c.data.prefetch = 2
  c.data.on_error = 'raise'         # 'raise' or 'skip' (warn and count) for bad input files

  # Models (sections 1, 2, 6).
  c.model = ml_collections.ConfigDict()
  c.model.width_div = 1             # divide every channel count (tests use narrow nets of the same code)
  c.model.dtype = 'float32'         # compute dtype: 'float32' or 'bfloat16' (params stay float32)
  c.model.init_weights = ''         # ImageNet ResNet38: MXNet .params, converted .npz/.pth, or '' (random)
  c.model.calibrate_bn = False      # without init_weights: set the frozen BN statistics from one data batch

  # SEAM training (section 3).
  c.train = ml_collections.ConfigDict()
  c.train.batch_size = 8            # global batch over all devices and hosts
  c.train.epochs = 8
  c.train.max_steps = -1            # -1: floor(len(list) / batch) * epochs
  c.train.lr = 0.01
  c.train.weight_decay = 5e-4
  c.train.momentum = 0.0005         # QUIRK: the original's momentum slot holds the weight decay value
  c.train.fix_momentum = False      # True: use `fixed_momentum` instead (the intended SGD momentum)
  c.train.fixed_momentum = 0.9
  c.train.poly_power = 0.9
  c.train.scale_factor = 0.3        # the equivariant transform: rescale by this factor
  c.train.transform = 'rescale'     # 'rescale', 'flip' or 'rot90' (general equivariance constraint)
  c.train.topk_ratio = 0.2          # ECR pixel selection
  c.train.log_every = 50
  c.train.ckpt_every = 500
  c.train.keep_checkpoints = 3
  c.train.image_summaries = True
  c.train.fast_compile = False      # CPU only: compile the step without LLVM optimisation (small runs)

  # CAM inference and CRF (section 4).
  c.infer = ml_collections.ConfigDict()
  c.infer.list = 'train_aug'        # CAMs + CRF of train_aug feed AffinityNet; eval uses train
  c.infer.checkpoint = ''           # '' = <workdir>/seam/export; or a .pth / .npz / orbax dir
  c.infer.scales = (0.5, 1.0, 1.5, 2.0)
  c.infer.flip = True
  c.infer.bucket = 64               # pad view sizes up to multiples of this (fewer recompilations)
  # Padding is exact (conv inputs and the PCM are masked to each view's valid region); 1 = no padding, one
  # compilation per distinct view shape.
  c.infer.batch_size = 8            # views per device step (global; rounded up to a multiple of the devices)
  c.infer.max_pending = 16          # images held while their views wait for a batch of the same padded shape
  c.infer.threads = 4               # host threads preparing views and merging/saving CAMs
  c.infer.cam_dir = 'work_dirs/voc12/cam'
  c.infer.label_dir = ''            # optional label PNGs (argmax with bg = bg_threshold)
  c.infer.overlay_dir = ''          # optional CAM overlays for looking at
  c.infer.bg_threshold = 0.26
  c.infer.crf_dir = 'work_dirs/voc12/crf'   # outputs <crf_dir>_4.0 and <crf_dir>_24.0
  c.infer.crf_alphas = (4.0, 24.0)
  c.infer.crf_iters = 10
  c.infer.crf_workers = 0           # 0 = all cores
  c.infer.force = False             # recompute outputs that already exist

  # Evaluation (section 5).
  c.eval = ml_collections.ConfigDict()
  c.eval.list = 'train'
  c.eval.gt_dir = ''                # '' = <voc_root>/SegmentationClass
  c.eval.pred_dir = ''              # '' = infer.cam_dir
  c.eval.pred_type = 'npy'          # 'npy' (CAM dicts + threshold curve), 'crf' (CRF score dicts) or 'png'
  c.eval.thresholds = (0.0, 0.6, 0.01)  # start, stop (exclusive), step -> 60 values
  c.eval.out_dir = 'work_dirs/voc12/eval'
  c.eval.workers = 0                # processes reading predictions; 0 = all cores, 1 = in-process

  # AffinityNet training (section 6).
  c.aff = ml_collections.ConfigDict()
  c.aff.train_list = 'train_aug'
  c.aff.la_dir = ''                 # '' = <infer.crf_dir>_4.0
  c.aff.ha_dir = ''                 # '' = <infer.crf_dir>_24.0
  c.aff.radius = 5
  c.aff.crop_size = 448
  c.aff.batch_size = 8
  c.aff.epochs = 8
  c.aff.max_steps = -1
  c.aff.lr = 0.01
  c.aff.weight_decay = 5e-4
  c.aff.init_weights = ''           # ImageNet ResNet38 as for SEAM
  c.aff.normalize_before_crop = False  # False = the original: crop the uint8 image (padding = black, i.e. -mean/std
                                       # once normalised); True: pad 0 in normalised space as in SEAM training
  # Optimizer and bookkeeping fields the generic trainer reads (same meaning as in c.train).
  c.aff.momentum = 0.0005           # QUIRK as in c.train
  c.aff.fix_momentum = False
  c.aff.fixed_momentum = 0.9
  c.aff.poly_power = 0.9
  c.aff.log_every = 50
  c.aff.ckpt_every = 500
  c.aff.keep_checkpoints = 3
  c.aff.image_summaries = False
  c.aff.fast_compile = False

  # Random walk (section 7).
  c.rw = ml_collections.ConfigDict()
  c.rw.list = 'train'
  c.rw.checkpoint = ''              # '' = <workdir>/affinity/export
  c.rw.cam_dir = ''                 # '' = infer.cam_dir
  c.rw.out_dir = 'work_dirs/voc12/rw'
  c.rw.beta = 8
  c.rw.logt = 6
  c.rw.alpha = 6.0
  c.rw.backend = 'numpy'            # 'numpy' (CPU reference) or 'jax'
  c.rw.jax_method = 'sparse'        # backend jax: 'sparse' (2**logt products v <- v @ T) or 'dense' (the
                                    # original's logt squarings of the dense T; n^2 memory)
  c.rw.batch_size = 1               # images of one padded size per network call
  c.rw.workers = 0                  # host processes for backend numpy (0 = all cores, 1 = inline)
  c.rw.save_scores = False
  c.rw.force = False
  return c
