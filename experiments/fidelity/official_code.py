"""The official PyTorch DiffMIC code (scott-yjyang/DiffMIC), imported from a folder outside this
repository, and its training iteration: shared by experiments/speed/official_timing.py (speed) and
experiments/fidelity/official_training_parity.py (fidelity). Needs torch and torchvision, which
diffmic-jax itself never imports.

Only the two CPU patches of shared/spec/PERF_ANCHOR.md are applied, at import time (the
official files are not edited); see PATCHES. Import-only stubs for modules that the official
files import but the timed code never calls are listed in IMPORT_STUBS.

`official_train_iteration` and `official_warmup_step` are the bodies of the official
`Diffusion.train()` loops (diffusion_trainer.py) for one batch, statement for statement, with
the official functions and objects (`Diffusion.compute_guiding_prediction`,
`nonlinear_guidance_model_train_step`, `q_sample`, `compute_mmd`, `EMA`, `get_optimizer`,
`adjust_learning_rate`) doing the work.
"""

import argparse
import os
import sys
import time
import types
import warnings

PATCHES = [
    "DCG device: the DCG hard-codes experiment_parameters device_type='gpu', gpu_number=0 "
    "(crop buffer moved to cuda:0 in DCG._retrieve_crop, ROI masks to cuda:0 in "
    "tools.generate_mask_uplft via RetrieveROIModule.gpu_number); patched after DCG.__init__ to "
    "device_type='cpu' and retrieve_roi_crops.gpu_number=None, so both stay on the CPU",
    "DCG backbones: pretraining.modules.resnet50(pretrained=True) -> "
    "torchvision.models.resnet50(weights=None) (no downloads possible; timings do not depend "
    "on weight values)",
]
IMPORT_STUBS = [
    "timm (model.py imports create_model; used only for arch='vit', not the paper's resnet18)",
    "statsmodels, cv2, skimage, imageio (imported by diffusion_trainer.py / dataloader/*.py; "
    "used only by the image data pipeline and plotting, never by the timed code)",
    "torchvision C++ ops: the only torchvision 0.28.0 wheel available is the CUDA build whose "
    "_C.so cannot load against torch 2.13.0+cpu; its fake/autograd registrations for "
    "torchvision:: ops (nms, roi_align, ...) are skipped. ResNets use only torch ops",
]

# ---------------------------------------------------------------------------------------------
# Importing the official code (with the import-time patches)
# ---------------------------------------------------------------------------------------------

def _stub_module(name, **attrs):
  mod = types.ModuleType(name)
  mod.__dict__.update(attrs)
  mod.__harness_stub__ = True
  sys.modules[name] = mod
  return mod


def _import_torchvision(torch):
  """Imports torchvision; if its C++ ops cannot load (CUDA wheel on CPU torch), skips their
  fake/autograd registrations, which is all that fails."""
  import torch.library as tl
  orig_fake, orig_autograd = tl.register_fake, tl.register_autograd

  def _missing(op):
    name = op if isinstance(op, str) else getattr(op, "_name", getattr(op, "__name__", ""))
    name = str(name)
    if not name.startswith("torchvision::"):
      return False
    opname = name.split("::", 1)[1].split(".")[0]
    try:
      getattr(torch.ops.torchvision, opname)
      return False
    except (AttributeError, RuntimeError):
      return True

  def fake(op, *a, **k):
    if _missing(op):
      return (lambda fn: fn) if not a else a[0]
    return orig_fake(op, *a, **k)

  def autograd(op, *a, **k):
    if _missing(op):
      return None
    return orig_autograd(op, *a, **k)

  tl.register_fake, tl.register_autograd = fake, autograd
  try:
    with warnings.catch_warnings():
      warnings.simplefilter("ignore")
      import torchvision
  finally:
    tl.register_fake, tl.register_autograd = orig_fake, orig_autograd
  return torchvision


def import_official(official_dir):
  """Imports the official modules with the patches applied; returns a namespace of them."""
  import torch
  os.environ.setdefault("MPLBACKEND", "Agg")
  torchvision = _import_torchvision(torch)

  # Import-only stubs (never called by the timed code).
  for name in ("timm", "timm.models"):
    if name not in sys.modules:
      _stub_module(name, create_model=_unavailable("timm.create_model"))
  if "timm.models" in sys.modules and "timm" in sys.modules:
    sys.modules["timm"].models = sys.modules["timm.models"]
  for name in ("statsmodels", "statsmodels.api", "cv2", "imageio"):
    try:
      __import__(name)
    except ImportError:
      _stub_module(name)
  try:
    import skimage.filters  # noqa: F401
  except ImportError:
    sk = _stub_module("skimage")
    sk.filters = _stub_module("skimage.filters")

  sys.path.insert(0, official_dir)
  with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    import pretraining.modules as modules
    import pretraining.dcg as dcg

    # Patch 2: no ImageNet weights (pretrained=True -> weights=None).
    def resnet50_no_weights(pretrained=False, **kwargs):
      return torchvision.models.resnet50(weights=None, **kwargs)
    modules.resnet50 = resnet50_no_weights

    # Patch 1: the DCG's hard-coded cuda:0 -> cpu.
    orig_init = dcg.DCG.__init__

    def dcg_init_cpu(self, parameters):
      orig_init(self, parameters)
      self.experiment_parameters["device_type"] = "cpu"
      self.retrieve_roi_crops.gpu_number = None
    dcg.DCG.__init__ = dcg_init_cpu

    import diffusion_trainer as trainer  # also brings model, utils, diffusion_utils, ema
  import diffusion_utils
  import model as model_mod
  import utils
  import ema
  return types.SimpleNamespace(torch=torch, torchvision=torchvision, trainer=trainer,
                               diffusion_utils=diffusion_utils, model=model_mod, utils=utils,
                               ema=ema, dcg=dcg)


def _unavailable(what):
  def fn(*a, **k):
    raise RuntimeError(f"{what} is an import stub in this harness")
  return fn


def dict2namespace(config):
  """As the official main.py does (main.py parses argv at import, so it is not imported)."""
  ns = argparse.Namespace()
  for key, value in config.items():
    setattr(ns, key, dict2namespace(value) if isinstance(value, dict) else value)
  return ns


def build(off, official_dir, config_path, adjust=None):
  """The official objects as main.py + Diffusion.train() build them (no data loaders).

  `adjust(config)`, if given, edits the parsed config before anything is built (e.g. the
  number of classes and timesteps of a tiny test model)."""
  import yaml
  torch = off.torch
  with open(os.path.join(official_dir, config_path)) as f:
    config = dict2namespace(yaml.safe_load(f))
  # What main.parse_config sets for a training / test run with the default flags + --ni.
  config.diffusion.noise_prior = False
  config.model.cat_y_pred = True
  config.device = torch.device("cpu")
  config.tb_logger = None
  if adjust is not None:
    adjust(config)
  args = argparse.Namespace(add_ce_loss=False, train_guidance_only=False,
                            resume_training=False, eval_best=True, test=False, ni=True,
                            noise_prior=False, log_path=None)
  runner = off.trainer.Diffusion(args, config, device=config.device)
  model = off.model.ConditionalModel(config, guidance=config.diffusion.include_guidance)
  model = model.to(runner.device)
  return config, args, runner, model


class TrainState:
  """The optimisers and EMA exactly as Diffusion.train() creates them."""

  def __init__(self, off, runner, model, config):
    U = off.utils
    self.optimizer = U.get_optimizer(config.optim, model.parameters())
    self.aux_optimizer = U.get_optimizer(config.aux_optim, runner.cond_pred_model.parameters())
    self.ema_helper = None
    if config.model.ema:
      self.ema_helper = off.ema.EMA(mu=config.model.ema_rate)
      self.ema_helper.register(model)
    self.step = 0
    # Mid-run LR schedule position (the cost does not depend on it; epoch 0, i=0 gives lr=0).
    self.epoch, self.i, self.len_loader = 100, 0, 110


def official_warmup_step(off, runner, config, state, x_batch, y_labels_batch):
  """One iteration of the official DCG pre-training loop (diffusion_trainer.py, train())."""
  U = off.utils
  runner.cond_pred_model.train()
  y_one_hot_batch, y_logits_batch = U.cast_label_to_one_hot_and_prototype(y_labels_batch, config)
  return runner.nonlinear_guidance_model_train_step(
      x_batch.to(runner.device), y_one_hot_batch.to(runner.device), state.aux_optimizer)


def official_train_iteration(off, runner, model, config, args, state, x_batch, y_labels_batch,
                             phases=None, record=None):
  """The body of the official Diffusion.train() batch loop for one batch (logging to
  TensorBoard is off as with --ni; checkpoint writes at step 1 / every 1e9 steps are not part
  of a steady-state iteration and are skipped).

  Args:
    phases: optional {phase: [seconds]} that gets this call's phase timings appended.
    record: optional dict that receives the iteration's tensors: 't', 'e' (its two random
      draws), 'lr', the loss terms 'mse', 'mmd_global', 'mmd_local', 'loss' and 'grad_norm'
      (the total norm clip_grad_norm_ returns, before clipping), as 0-d or 1-d tensors.
  Returns:
    (loss.item(), the joint DCG step's loss or None).
  """
  torch, U, D = off.torch, off.utils, off.diffusion_utils
  tp = [time.perf_counter()]
  y_one_hot_batch, y_logits_batch = U.cast_label_to_one_hot_and_prototype(y_labels_batch, config)
  if config.optim.lr_schedule:
    U.adjust_learning_rate(state.optimizer, state.i / state.len_loader + state.epoch, config)
  n = x_batch.size(0)
  x_unflat_batch = x_batch.to(runner.device)
  if config.data.dataset == "toy" or config.model.arch in ["simple", "linear"]:
    x_batch = torch.flatten(x_batch, 1)
  model.train()
  runner.cond_pred_model.eval()
  state.step += 1

  t = torch.randint(low=0, high=runner.num_timesteps, size=(n // 2 + 1,)).to(runner.device)
  t = torch.cat([t, runner.num_timesteps - 1 - t], dim=0)[:n]

  x_batch = x_batch.to(runner.device)
  y_0_hat_batch, y_0_global, y_0_local = runner.compute_guiding_prediction(x_unflat_batch)
  y_0_hat_batch = y_0_hat_batch.softmax(dim=1)
  y_0_global, y_0_local = y_0_global.softmax(dim=1), y_0_local.softmax(dim=1)
  tp.append(time.perf_counter())

  y_T_mean = y_0_hat_batch
  if config.diffusion.noise_prior:
    y_T_mean = torch.zeros(y_0_hat_batch.shape).to(y_0_hat_batch.device)
  y_0_batch = y_one_hot_batch.to(runner.device)
  e = torch.randn_like(y_0_batch).to(y_0_batch.device)
  y_t_batch = D.q_sample(y_0_batch, y_T_mean, runner.alphas_bar_sqrt,
                         runner.one_minus_alphas_bar_sqrt, t, noise=e)
  y_t_batch_global = D.q_sample(y_0_batch, y_0_global, runner.alphas_bar_sqrt,
                                runner.one_minus_alphas_bar_sqrt, t, noise=e)
  y_t_batch_local = D.q_sample(y_0_batch, y_0_local, runner.alphas_bar_sqrt,
                               runner.one_minus_alphas_bar_sqrt, t, noise=e)
  output = model(x_batch, y_t_batch, t, y_0_hat_batch)
  output_global = model(x_batch, y_t_batch_global, t, y_0_global)
  output_local = model(x_batch, y_t_batch_local, t, y_0_local)
  # official: loss = (e - output).square().mean() + 0.5*(compute_mmd(e, output_global) +
  # compute_mmd(e, output_local)), evaluated left to right; the terms are named for `record`.
  mse = (e - output).square().mean()
  mmd_global = D.compute_mmd(e, output_global)
  mmd_local = D.compute_mmd(e, output_local)
  loss = mse + 0.5 * (mmd_global + mmd_local)
  loss0 = torch.tensor([0])  # noqa: F841  (args.add_ce_loss is False in the official scripts)
  tp.append(time.perf_counter())

  state.optimizer.zero_grad()
  loss.backward()
  tp.append(time.perf_counter())
  grad_norm = None
  try:
    grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), config.optim.grad_clip)
  except Exception:  # as official (it never raises here)
    pass
  state.optimizer.step()
  if config.model.ema:
    state.ema_helper.update(model)
  tp.append(time.perf_counter())

  aux_loss = None
  if config.diffusion.apply_aux_cls and config.diffusion.aux_cls.joint_train:
    runner.cond_pred_model.train()
    aux_loss = runner.nonlinear_guidance_model_train_step(x_unflat_batch, y_0_batch,
                                                          state.aux_optimizer)
  tp.append(time.perf_counter())
  if record is not None:
    record.update(t=t, e=e, lr=state.optimizer.param_groups[0]["lr"], mse=mse,
                  mmd_global=mmd_global, mmd_local=mmd_local, loss=loss, grad_norm=grad_norm)
  state.i = (state.i + 1) % state.len_loader
  if phases is not None:
    for name, a, b in zip(("dcg_eval_forward", "three_eps_forwards_and_loss", "backward",
                           "clip_adam_ema", "joint_dcg_step"), tp[:-1], tp[1:]):
      phases.setdefault(name, []).append(b - a)
  return loss.item(), aux_loss


def tree_commit(official_dir):
  """The official tree's commit: `git rev-parse HEAD` there, or its OFFICIAL_COMMIT file."""
  import subprocess  # pylint: disable=g-import-not-at-top
  try:
    out = subprocess.run(["git", "-C", official_dir, "rev-parse", "HEAD"], capture_output=True,
                         text=True, check=True, timeout=30)
    return out.stdout.strip()
  except (OSError, subprocess.SubprocessError):
    pass
  try:
    with open(os.path.join(official_dir, "OFFICIAL_COMMIT")) as f:
      return f.read().strip() or None
  except OSError:
    return None
