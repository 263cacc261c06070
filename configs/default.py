"""Default configuration: the official DiffMIC code's settings (REFERENCE.md §1.3, §6).

Every experiment config imports this file and overrides only what differs. Every field is
live; the comment says what it does. Paper variants of official behaviour are switches here.
"""

import ml_collections


def get_config() -> ml_collections.ConfigDict:
  config = ml_collections.ConfigDict()
  config.seed = 1234  # official --seed default; drives init, diffusion noise and data order.
  # Paper Table 2 ablation: 'basic' (ResNet-18 + CE), 'c1' (diffusion on a single classifier's
  # prior), 'c2' (+ DCG), 'full' (+ MMD).
  config.ablation = "full"

  config.data = data = ml_collections.ConfigDict()
  # demo | ham10000 | aptos2019 | image_folder | manifest | official_pickle | medmnist.
  data.name = "demo"
  data.manual_dir = ""  # folder holding the raw downloaded files (builders never download).
  data.data_dir = ""  # where prepared TFDS datasets are written; '' = ~/tensorflow_datasets.
  data.image_size = 224  # square side after centre square crop + resize (done at build time).
  data.num_classes = 4  # must equal the dataset's number of classes (checked).
  data.class_names = ()  # image_folder/manifest/pickle/medmnist: label order; else display names.
  data.label_order = "official"  # HAM: official (MEL,NV,BCC,AKIEC,BKL,DF,VASC) | alphabetical.
  data.test_fraction = 0.3  # paper protocol: HAM10000/APTOS 7:3, PMG 8:2.
  data.val_fraction = 0.1  # of the train part, carved out (stratified) to select checkpoints.
  data.split_seed = 2000  # seed of the train/val/test split (official data.seed).
  data.split_file = ""  # JSON (as the saved split.json) or CSV id,split overriding the split.
  data.group_split = False  # keep all images of a group (HAM10000 lesion_id) on one side.
  data.hflip = True  # official: RandomHorizontalFlip(0.5).
  data.vflip = False  # official: APTOS only.
  data.rotation_degrees = 30.0  # official: RandomRotation(30), bilinear, black fill.
  data.num_workers = 0  # grain worker processes; 0 = in-process (fastest on 2 cores).
  data.class_balanced = False  # draw the classes in turn (equal counts), for long-tailed sets.
  data.skip_bad_images = False  # skip bad examples (listed in build_report.json), not fail.
  data.deduplicate = False  # drop duplicate images (and conflicting copies) before splitting.
  data.dedup_threshold = 8.0  # RMS of 16x16 grey thumbnails (0-255) for a duplicate; 0 = exact.
  data.manifest_file = ""  # CSV manifest path,label[,split][,group] for data.name='manifest'.
  data.train_pickle = ""  # official DiffMIC train split pickle for data.name='official_pickle'.
  data.test_pickle = ""  # official DiffMIC test split pickle for data.name='official_pickle'.
  data.demo_num_examples = 1200  # size of the synthetic demo dataset.
  data.demo_seed = 0  # seed of the synthetic demo images (the split uses split_seed).

  # Dual-granularity conditional guidance (DCG), REFERENCE.md §2.
  config.guidance = guidance = ml_collections.ConfigDict()
  guidance.backbone = "resnet50"  # resnet18 | resnet50 (official: resnet50 for both trunks).
  guidance.width = 64  # base width of the ResNet trunks (64 = torchvision).
  guidance.stage_sizes = ()  # () = the backbone's standard depth; tiny tests use e.g. (1, 1).
  guidance.pretrained = ""  # .npz of converted torchvision weights for both trunks ('' = random).
  # A trained run of ours whose trunks initialise the guidance model (both DCG trunks, or the
  # classifier's): a workdir (its best checkpoint, else its latest), W/checkpoints_best,
  # W/checkpoints or one step's folder. The source may be a 'basic' run's classifier or a DCG;
  # heads that do not fit (another number of classes) keep their initialisation. '' = off.
  guidance.init_from = ""
  guidance.num_rois = 6  # K crops chosen greedily from the saliency map.
  guidance.crop_size = 32  # crop side in pixels (32 on 224 = one cell of the 7x7 CAM grid).
  guidance.crop_channels = "first"  # first (official: channel 0 repeated) | all.
  guidance.top_t_percent = 1.0  # fraction of CAM cells averaged into the global logits.
  guidance.attention_dim = 128  # gated-attention MIL hidden width (U and V).
  guidance.fusion_weight = 0.5  # y_fused = w * y_global + (1 - w) * y_local (logits).
  guidance.pretrain_epochs = 15  # DCG warm-up epochs (official 15; the paper says 10).
  guidance.joint_train = True  # one DCG CE step per diffusion step on the same batch.
  guidance.loss = "fused"  # fused (official) | all (CE on fused + global + local).
  guidance.lr = 2e-4
  # Which AMSGrad the DCG's Adam uses (AMSGrad is always on, as in the official code):
  # torch (PyTorch's: max of the raw nu, then bias-corrected) | optax (max of bias-corrected nu).
  guidance.amsgrad = "torch"
  guidance.b1 = 0.9
  guidance.b2 = 0.999
  guidance.eps = 1e-8

  # Denoiser eps_theta and image encoder rho(x), REFERENCE.md §3, §4.
  config.model = model = ml_collections.ConfigDict()
  model.encoder = "resnet18"  # backbone of rho(x), randomly initialised as in the official code.
  model.encoder_width = 64
  model.encoder_stage_sizes = ()
  model.encoder_pretrained = ""  # optional .npz of converted torchvision weights for rho(x).
  # Trunk of the 'basic' and 'c1' classifier: encoder (built like rho(x)'s trunk: the paper's
  # ResNet-18 baseline) | guidance (built like the DCG's trunks, e.g. to start from the same
  # pretrained trunk through guidance.init_from or guidance.pretrained).
  model.classifier_trunk = "encoder"
  # A trained run of ours (as guidance.init_from) whose ρ(x), else whose guidance image trunk,
  # initialises ρ(x)'s trunk; '' = off (the official ρ(x) is random).
  model.encoder_init_from = ""
  model.feature_dim = 6144  # F: width of rho(x) and of the conditional MLP.
  model.conditioning = "prior"  # prior: [y_t, y_hat] (2C, official) | dual: [y_t, y_g, y_l].
  # Probability that a training example's conditioning y_hat is replaced by 1/C (the prior mean
  # in the forward process is kept), so that the denoiser must read the image through rho(x)
  # rather than copy the guidance; 0 = off (official).
  model.cond_dropout = 0.0
  model.dtype = "float32"  # compute dtype: float32 | bfloat16 (params, stats stay float32).
  # auto | xla | im2col | patches | winograd: convolution formulation (CPU speed only).
  model.conv_impl = "auto"
  model.bn_running_var = "unbiased"  # unbiased (PyTorch parity) | biased (Flax default).

  # CARD diffusion, REFERENCE.md §5.
  config.diffusion = diffusion = ml_collections.ConfigDict()
  diffusion.timesteps = 1000  # T; schedule indices 0..T-1.
  diffusion.beta_start = 1e-4
  diffusion.beta_end = 0.02
  # float32: beta, alpha, alpha-bar built in float32 exactly as the official torch code (bit for
  # bit) | float64: built in float64, rounded once (the chain then drifts ~2e-4 relative).
  diffusion.schedule_dtype = "float32"
  diffusion.prior = "fused"  # fused: softmax(y_fused) (official) | zero (--noise_prior).
  diffusion.mmd_weight = 0.5  # lambda on MMD_g + MMD_l.
  diffusion.mmd_kernel = "gaussian"  # gaussian (official, exp(-|a-b|^2/C^2)) | multi.
  diffusion.test_steps = 250  # N, the number of reverse steps of the test chain.
  diffusion.sampler = "official_truncated"  # official_truncated | full | respaced.
  diffusion.val_sampler = "full"  # sampler used for validation during training (official: full).
  diffusion.val_steps = 1000  # N reverse steps for validation with val_sampler (ignored by 'full').
  # Deprecated names of test_steps and val_steps: a value set here is moved onto the new field
  # with a warning (run.apply_deprecated_names); None = unset.
  diffusion.test_timesteps = ml_collections.config_dict.placeholder(int)
  diffusion.val_timesteps = ml_collections.config_dict.placeholder(int)
  diffusion.num_samples = 1  # samples per image in validation during training.
  # S reverse samples per image for --mode eval and --mode predict: the probabilities average
  # softmax(y0) over them, and their vote, agreement and y0 intervals are the uncertainty
  # scores (1 = a single chain, no sample uncertainty). The chain costs S times more.
  diffusion.predict_num_samples = 8
  # Bound on y0_hat inside the reverse chain, as DDPM's clip_denoised ([-clip, clip]; one-hot
  # labels live in [0, 1]); 0 = off (official). Stops an untrained chain from diverging.
  diffusion.clip_y0 = 0.0
  # The reverse chain's copy of the denoiser's dense kernels: float32 (exact) | bfloat16 (rounded
  # to bfloat16, sums in float32: on CPU one image's chains read half the bytes, typically 0.73 s
  # against 1.2 s for 100 steps on a Zen 4; docs/predict.md). Training never sees it.
  diffusion.sampler_weights = "float32"

  # Denoiser optimiser, REFERENCE.md §6.
  config.optim = optim = ml_collections.ConfigDict()
  optim.lr = 1e-3
  optim.b1 = 0.9
  optim.b2 = 0.999
  optim.eps = 1e-8
  optim.warmup_epochs = 40  # linear warm-up from 0, then cosine to min_lr, per iteration.
  optim.min_lr = 0.0
  optim.grad_clip = 1.0  # global-norm clipping.
  optim.ema_decay = 0.9999
  optim.eval_with_ema = False  # official: the EMA is kept but never used for evaluation.

  config.training = training = ml_collections.ConfigDict()
  training.batch_size = 64
  training.eval_batch_size = 64
  training.num_epochs = 1000
  training.eval_every_epochs = 10  # validation cadence (official: every 10 epochs and at the end).
  training.select_best_on = "val"  # val | test (official: best on test).
  # Metric of the first head (diffusion, else the guidance model) that picks the best checkpoint:
  # accuracy (official) | f1_macro | balanced_accuracy.
  training.select_metric = "accuracy"
  training.checkpoint_every_steps = 1000  # also at the end of every stage.
  training.keep_checkpoints = 3  # latest K kept; the best-on-validation one is kept apart.
  training.log_every_steps = 50
  # Evaluation explanations (eval/overlays/): the DCG's CAM and ROI boxes over this many test
  # images, the most confidently wrong first; 0 writes none.
  training.eval_overlays = 16
  # Join a multi-process run (jax.distributed; set by diffmic_jax.launch, or on a cluster).
  training.distributed = False
  # 'N,M': a jax.profiler trace of global steps N..M (inclusive) in DIR/profile/; '' = off.
  training.profile_steps = ""
  # Resume even when fields that alter the run (model, data, optimiser, schedule, seed, ...)
  # differ from DIR/config.json; the mix is recorded in DIR/config_changes.jsonl.
  training.allow_config_change = False
  return config
