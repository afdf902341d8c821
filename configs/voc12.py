"""Full PASCAL VOC 2012 (+SBD) recipe of the original SEAM release (../shared/SEAM_SPEC.md).

Every stage reads this one config; override any field on the command line, e.g.
`python train.py --config=configs/voc12.py --config.train.batch_size=4`.
"""
import ml_collections

from configs import sections


def get_config():
  c = ml_collections.ConfigDict()
  c.seed = 0
  # Every stage's outputs go below this folder (seam_jax.layout); the path fields below left '' derive from it,
  # and setting one explicitly overrides just that path.
  c.workdir = 'work_dirs/voc12'

  # Data (section 8). `voc_root` holds JPEGImages/, SegmentationClass(Aug)/, Annotations/, ImageSets/.
  c.data = ml_collections.ConfigDict()
  # The input layout (README, "Bring your own data"): 'voc' (voc_root below), 'coco' (COCO-format JSON:
  # train_annotations / val_annotations, image_dir / val_image_dir) or 'csv' (images + an `image,labels` CSV, no
  # masks: the evaluation stages are skipped). prepare turns each into the same lists, labels and dataset.json.
  c.data.format = 'voc'
  c.data.classes = ()               # foreground class names in index order; () = VOC's 20 (voc) or the CSV's sorted
                                    # names (csv); coco takes them from the JSON's categories (sorted by id)
  c.data.dataset_file = ''          # or a dataset.json of your own (README: names, ignore label, palette; voc, csv)
  c.data.train_annotations = ''     # coco: instances_train*.json; csv: the training images' label CSV
  c.data.val_annotations = ''       # coco / csv: the same for the val images ('' = no val set)
  c.data.image_dir = ''             # coco / csv: the folder the training file names are relative to
  c.data.val_image_dir = ''         # '' = image_dir
  c.data.voc_root = 'data/VOC2012'
  c.data.sbd_root = ''              # optional SBD `dataset/` folder (cls/*.mat, train.txt, val.txt)
  c.data.list_dir = ''              # '' = <workdir>/lists: prepare writes train_aug.txt, train.txt, val.txt here
  c.data.cls_labels = ''            # '' = <list_dir>/cls_labels.npy
  c.data.label_source = 'xml'       # 'xml' (original) or 'masks' (SegmentationClassAug)
  c.data.train_list = 'train_aug'   # name in list_dir, or a path to a list file
  c.data.crop_size = 448
  c.data.resize_long = (448, 768)   # inclusive range for the random long side
  c.data.jitter = (0.3, 0.3, 0.3, 0.1)  # brightness, contrast, saturation, hue
  c.data.num_workers = 4
  c.data.prefetch = 2
  c.data.on_error = 'raise'         # 'raise' or 'skip' (warn and count) for bad input files
  # Colour jitter, normalisation and crop in the jitted train step (seam_jax.data.device_augment: the same numbers
  # as the host path); host workers then only decode, resize and flip. False: all on the host.
  c.data.device_augment = True
  c.data.aff_canvas = 512           # AffinityNet's device canvas side (no resize there): >= the largest image side

  # Models (sections 1, 2, 6).
  c.model = sections.model()

  # SEAM training (section 3): the trainer's fields (configs/sections.py: batch 8 over all devices and hosts,
  # 8 epochs, lr 0.01, weight decay 5e-4, the QUIRK momentum 0.0005, poly 0.9, frozen conv1a and b2*) and SEAM's own.
  c.train = sections.trainer(image_summaries=True)
  c.train.scale_factor = 0.3        # the equivariant transform: rescale by this factor
  c.train.equivariance = 'rescale'  # 'rescale', 'flip' or 'rot90' (general equivariance constraint)
  c.train.topk_ratio = 0.2          # ECR pixel selection

  # CAM inference and CRF (section 4).
  c.infer = ml_collections.ConfigDict()
  c.infer.list = 'train_aug'        # CAMs + CRF of train_aug feed AffinityNet; eval uses train
  c.infer.checkpoint = ''           # '' = <workdir>/seam/export; or a .pth / .npz / orbax dir
  c.infer.scales = (0.5, 1.0, 1.5, 2.0)
  c.infer.flip = True
  c.infer.bucket = 64               # pad view sizes up to multiples of this (fewer recompilations)
  # Padding is exact (conv inputs and the PCM are masked to each view's valid region); 1 = no padding, one
  # compilation per distinct view shape.
  c.infer.batch_size = 0            # views per step (global, rounded up to the devices); 0 = auto: 1 per CPU device,
  # 8 on accelerators (seam_jax.common.bucketing.auto_batch_size)
  c.infer.max_pending = 16          # images held while their views wait for a batch of the same padded shape
  c.infer.threads = 4               # host threads preparing views and merging/saving CAMs
  c.infer.cam_dir = ''              # '' = <workdir>/cam
  c.infer.label_dir = ''            # optional label PNGs (argmax with bg = bg_threshold)
  c.infer.overlay_dir = ''          # optional CAM overlays for looking at
  c.infer.bg_threshold = 0.26
  c.infer.crf_dir = ''              # '' = <workdir>/crf; outputs <crf_dir>_4.0 and <crf_dir>_24.0
  c.infer.crf_alphas = (4.0, 24.0)
  c.infer.crf_iters = 10
  c.infer.crf_workers = 0           # 0 = all cores

  # Evaluation (section 5).
  c.eval = ml_collections.ConfigDict()
  c.eval.list = 'train'
  c.eval.gt_dir = ''                # '' = <voc_root>/SegmentationClass (voc), <workdir>/gt (coco), none (csv)
  c.eval.pred_dir = ''              # '' = infer.cam_dir
  c.eval.pred_type = 'npy'          # 'npy' (CAM dicts + threshold curve), 'crf' (CRF score dicts) or 'png'
  c.eval.thresholds = (0.0, 0.6, 0.01)  # start, stop (exclusive), step -> 60 values
  c.eval.out_dir = ''               # '' = <workdir>/eval
  c.eval.workers = 0                # processes reading predictions; 0 = all cores, 1 = in-process

  # AffinityNet training (section 6).
  c.aff = sections.trainer()        # as SEAM's: batch 8, 8 epochs, lr 0.01, the same QUIRK momentum and frozen layers
  c.aff.train_list = 'train_aug'
  c.aff.la_dir = ''                 # '' = <infer.crf_dir>_4.0
  c.aff.ha_dir = ''                 # '' = <infer.crf_dir>_24.0
  c.aff.radius = 5
  c.aff.crop_size = 448
  c.aff.normalize_before_crop = False  # False = the original: crop the uint8 image (padding = black, i.e. -mean/std
                                       # once normalised); True: pad 0 in normalised space as in SEAM training

  # Random walk (section 7).
  c.rw = ml_collections.ConfigDict()
  c.rw.list = 'train_aug'           # the segmentation retrain learns from these labels (eval_rw scores eval.list)
  c.rw.checkpoint = ''              # '' = <workdir>/affinity/export
  c.rw.cam_dir = ''                 # '' = infer.cam_dir
  c.rw.out_dir = ''                 # '' = <workdir>/rw
  c.rw.beta = 8
  c.rw.logt = 6
  c.rw.alpha = 6.0
  c.rw.backend = 'numpy'            # 'numpy' (CPU reference) or 'jax'
  c.rw.jax_method = 'sparse'        # backend jax: 'sparse' (2**logt products v <- v @ T) or 'dense' (the
                                    # original's logt squarings of the dense T; n^2 memory)
  c.rw.batch_size = 1               # images of one padded size per network call
  c.rw.workers = 0                  # host processes for backend numpy (0 = all cores, 1 = inline)
  c.rw.save_scores = False

  # Segmentation retrain on the random-walk pseudo labels (../shared/RETRAIN_SPEC.md; the authors' SSC code).
  # The trainer's fields: batch 10 (global), 20000 steps, lr 0.001, momentum 0.9, QUIRK Q5: lr = base * (1 - i /
  # (max_steps + 1)) ** 0.9, QUIRK Q1: conv1a is trained (the backbone's not_training list never applies);
  # init_weights '' = model.init_weights (ImageNet .params), or an export folder / .pth.
  c.seg = sections.trainer(batch_size=10, max_steps=20000, epochs=0, lr=0.001, momentum=0.9, poly_extra_steps=1,
                           frozen_layers=(), ckpt_every=1000, keep_checkpoints=2)
  c.seg.train_list = 'train_aug'    # the original trains on train_aug: the random walk must cover it (rw.list)
  c.seg.label_dir = ''              # '' = <workdir>/rw (the random-walk PNGs)
  c.seg.init_from_seam = False      # with init_weights '': start from this run's SEAM export (its backbone)
  c.seg.crop_size = 448
  c.seg.scale_range = (0.5, 1.5)    # RandomScale, continuous
  c.seg.hsv_deltas = (10, 10, 10)   # RandomHSV: integer deltas in [-d, d] for H (mod 180), S, V
  c.seg.flip_prob = 0.5
  c.seg.bn_mode = 'group'           # QUIRK Q1 'group': BN statistics per group of bn_group images (2 GPUs x 5);
  c.seg.bn_group = 5                # 'sync': over the global batch; 'frozen': running statistics (as SEAM)
  c.seg.bn_momentum = 0.9997        # running statistics, Flax convention (PyTorch momentum 0.0003)
  # Test (section 4): 6 scales x flip, mean of the logits, softmax, 1-iteration CRF, argmax PNGs.
  c.seg.test_list = 'val'
  c.seg.checkpoint = ''             # '' = <workdir>/seg/export; or a .pth of the original (deeplabv1 ResNet38)
  c.seg.scales = (0.5, 0.75, 1.0, 1.25, 1.5, 1.75)
  c.seg.flip = True
  c.seg.crf = True
  c.seg.crf_iters = 1               # QUIRK Q6: one mean-field iteration, bilateral sxy 32
  c.seg.max_side = 1000             # longer sides above: tested downscaled, labels resized back (bounded memory);
                                    # VOC images are <= 500, so the recipe's results are unchanged. 0 = no limit
  c.seg.out_dir = ''                # '' = <workdir>/seg_pred
  c.seg.predict_dir = ''            # '' = <workdir>/predict (predict.py)
  c.seg.bucket = 64                 # pad view sizes up to multiples of this (exact: conv inputs are masked)
  c.seg.test_batch_size = 0         # views per step (rounded up to the local devices); 0: auto as infer.batch_size
  c.seg.max_pending = 8             # images held while their views wait for a batch of the same padded shape
  c.seg.threads = 2                 # host threads fusing the views, running the CRF and writing PNGs

  # SEAM against the plain-CAM baseline, and the pipeline's report (seam_jax.stages, seam_jax.report; issue 15).
  c.train.method = 'seam'           # 'seam' (the paper's loss) or 'cam': the baseline, classification loss on the
                                    # CAM branch alone (no ER, ECR, PCM terms)
  c.infer.branch = ''               # CAMs from 'cam_rv' (the PCM output: SEAM) or 'cam' (the classifier branch);
                                    # '' = per train.method ('cam_rv' for seam, 'cam' for cam)
  c.pipeline = ml_collections.ConfigDict()
  c.pipeline.compare_baseline = False  # also run train..eval_rw with train.method='cam' in <workdir>/baseline
  c.pipeline.report_images = 6      # images shown as strips (image | truth | CAM | CRF | ...) in the report
  return c
