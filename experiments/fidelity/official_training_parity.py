#!/usr/bin/env python
"""Training fidelity: the official DiffMIC training iteration (scott-yjyang/DiffMIC) and ours,
side by side from one state with one batch and the same random draws, tensor for tensor.

The official code is imported from a folder outside this repository by
experiments/fidelity/official_code.py (the same patches and import stubs as
experiments/speed/official_timing.py)
and runs its own iteration: `official_warmup_step` (the DCG pre-training loop body,
`nonlinear_guidance_model_train_step` with the AMSGrad aux optimiser) and
`official_train_iteration` (the `Diffusion.train()` epoch-loop body: DCG eval forward, antithetic
t, one ε for the three q_sample streams, MSE + 0.5·(MMD_g + MMD_l), clip_grad_norm_ 1.0, Adam,
EMA, then the joint DCG step in train mode). Ours runs `train.make_train_steps(...)['warmup']`
and `['joint_draws']`, the production step bodies with their draws given.

Paper configuration (official configs/isic.yml; ours configs/ham10000.py: C=7, 224 px, F=6144,
T=1000, ResNet-50 DCG trunks, ResNet-18 ρ(x)), float32, one thread.

* One initial state: the official models built with --seed, then perturbed so that nothing is
  at its init value (BatchNorm scale ×(1 + 0.1·N(0,1)), shift 0.1·N(0,1), the time-embedding
  tables + 0.05·N(0,1)), then their BatchNorm running statistics calibrated on random images
  (one train-mode pass with a cumulative average). Ours is converted from these state_dicts by
  our own converter (`convert.build_official_state`). The DCG warm-up step and the joint
  iterations each start from this state, with fresh Adam / AMSGrad states on both sides and
  the EMA registered there; the diffusion LR at the official schedule's epoch LR_EPOCH = 100
  (the first iteration of a run has lr 0, which would hide the update).
* Batches of already-augmented images (N(0,1) tensors) and labels; for every iteration the
  official uniform draw t' (its `torch.randint`) and ε (its `torch.randn_like`) are drawn once
  and fed to both: to the official code by replacing those two torch functions during its
  iteration (it must call each exactly once), to ours as the draws pytree
  {'t': diffusion.antithetic_pairs(t'), 'e': ε}.
* Tolerance, measured: the official iteration also runs in float64 (same initial values, same
  draws; torch default dtype float64). For every tensor group the official code's own
  float32-vs-float64 spread s = ‖off32 − off64‖/‖off64‖ (normwise, on what the step changed:
  new − initial for state tensors, the value for losses) is the yardstick: ours passes when
  ‖ours − off64‖/‖off64‖ <= FACTOR·max(s, FLOOR), normwise over each group's tensors. Two
  independent float32 implementations each within s of the exact result differ by up to 2s,
  and s is one sample of a rounding error, whose size varies by about ×2 between samples:
  FACTOR = 4. FLOOR (float32 unit roundoff 2^-24) applies where the official code is exact.
  The scalar outputs (loss terms, gradient norm, DCG loss) each carry one sample of a rounding
  error, so their s is at least the spread pooled over all of them.
* Then --iterations consecutive iterations cycling through --num-batches batches: per-iteration
  loss terms of the three runs and the parameter drift (‖θ_k − θ_0‖ and the distance between
  runs on a strided subsample of every parameter tensor), in the JSON and a PNG, and the full
  state compared again after the last iteration.

Output: one line per tensor group, then `N passed, M failed`; exit status 1 if any failed.

Usage (torch 2.13 CPU; torchvision installed apart, see experiments/speed/official_timing.py):
  git --git-dir=<mirror> archive 23469e7 | tar -x -C /tmp/DiffMIC   # outside this repository
  python experiments/fidelity/official_training_parity.py --official-dir /tmp/DiffMIC \\
      --extra-path /tmp/tvlib --batch 4 --iterations 20 --json /tmp/parity.json
"""

import argparse
import contextlib
import gc
import json
import math
import os
import shutil
import sys
import tempfile
import time

_REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
if _REPO not in sys.path:
  sys.path.insert(0, _REPO)

FACTOR = 4.0
FLOOR = 2.0 ** -24
SCALARS = "_scalars"  # snapshots of scalar outputs share a pooled spread (see compare_arrays)
STRIDE = 499  # drift subsample: every STRIDE-th element of each flattened tensor
LR_EPOCH = 100  # official schedule position of the first compared iteration (epoch + i / len)
STEPS_PER_EPOCH = 110  # ISIC: ceil(7011 / 64)


def parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--official-dir", required=True,
                 help="the official repository's tree, outside this repository")
  p.add_argument("--extra-path", default=None,
                 help="a folder put first on sys.path (e.g. torchvision installed with "
                      "pip --target)")
  p.add_argument("--batch", type=int, default=4, help="batch size (default 4)")
  p.add_argument("--iterations", type=int, default=20,
                 help="consecutive joint iterations (default 20; the first is the one-step check)")
  p.add_argument("--num-batches", type=int, default=3, help="distinct batches cycled (default 3)")
  p.add_argument("--json", required=True, help="output JSON (a PNG is written beside it)")
  p.add_argument("--official-config", default="configs/isic.yml",
                 help="official config, relative to --official-dir")
  p.add_argument("--config", default="configs/ham10000.py", help="our config (paper HAM10000)")
  p.add_argument("--seed", type=int, default=1234, help="torch seed of models, data and draws")
  p.add_argument("--conv-impl", default=None,
                 help="our config.model.conv_impl (default: the config's, 'auto': on CPU "
                      "Winograd / im2col / patch matmuls where faster, see nn/fast_conv.py)")
  p.add_argument("--threads", type=int, default=1, help="threads of both frameworks (default 1)")
  p.add_argument("--official-commit", default=None)
  p.add_argument("--keep-records", default=None,
                 help="folder for the per-run state snapshots (default: a temporary folder, "
                      "removed at the end)")
  return p.parse_args(argv)


def fail(message):
  print(f"error: {message}", file=sys.stderr)
  raise SystemExit(1)


def check_inputs(a):
  """One clear line and exit 1 for a missing torch or a wrong --official-dir."""
  if a.extra_path:
    if not os.path.isdir(a.extra_path):
      fail(f"--extra-path {a.extra_path}: not a folder")
    sys.path.insert(0, os.path.abspath(a.extra_path))
  try:
    import torch  # noqa: F401  pylint: disable=g-import-not-at-top,unused-import
  except ImportError:
    fail("torch is not installed (this harness runs the official PyTorch code: "
         "pip install torch==2.13.0)")
  want = ("diffusion_trainer.py", "diffusion_utils.py", "model.py", "ema.py", "utils.py",
          os.path.join("pretraining", "dcg.py"), a.official_config)
  missing = [w for w in want if not os.path.isfile(os.path.join(a.official_dir, w))]
  if missing:
    fail(f"--official-dir {a.official_dir}: not the official DiffMIC tree (missing "
         f"{', '.join(missing)})")
  if a.batch < 2 or a.iterations < 1 or a.num_batches < 1:
    fail("--batch must be >= 2 (BatchNorm), --iterations and --num-batches >= 1")


# ---------------------------------------------------------------------------------------------
# Names: our flat variable keys <-> official state_dict keys (the converter's own mapping).


def key_map(abstract_variables, module_name, collections=("params", "batch_stats")):
  """{our flat key: (official key, layout transform)} for the given collections."""
  from diffmic_jax.nn import pretrained  # pylint: disable=g-import-not-at-top
  flat = pretrained.flatten({c: abstract_variables[c] for c in collections})
  out = {}
  for key, leaf_value in flat.items():
    _, *path, leaf = key.split(pretrained.SEP)
    torch_leaf, transform = pretrained.torch_leaf_name(leaf, len(leaf_value.shape))
    out[key] = (f"{module_name(path)}.{torch_leaf}", transform)
  return out


def official_maps(abstract_state):
  """The key maps of `official_snapshot` for our abstract TrainState."""
  from diffmic_jax import convert  # pylint: disable=g-import-not-at-top
  den, dcg = abstract_state.denoiser, abstract_state.guidance
  return {"denoiser": key_map(den, convert.official_denoiser_module),
          "dcg": key_map(dcg, convert.official_dcg_module),
          "ema": key_map(den, convert.official_denoiser_module, ("params",)),
          "dcg_params": key_map(dcg, convert.official_dcg_module, ("params",))}


def to_our_layout(tensors, mapping):
  """{official key: torch tensor} -> {our key: numpy array}, dtype kept (float64 stays); copies,
  so that a snapshot does not follow the in-place updates of later steps."""
  import numpy as np  # pylint: disable=g-import-not-at-top
  from diffmic_jax.nn import pretrained  # pylint: disable=g-import-not-at-top
  as_numpy = lambda v: v.detach().cpu().numpy() if hasattr(v, "detach") else v  # noqa: E731
  return {k: np.array(pretrained.to_ours(as_numpy(tensors[tk]), tr), copy=True)
          for k, (tk, tr) in mapping.items()}


# ---------------------------------------------------------------------------------------------
# Snapshots on disk (three runs of a 108 M + 48 M parameter model do not fit in memory at once).


class Store:
  """Snapshots as one .npy per tensor: root/<run>/<snapshot>/<key>.npy."""

  def __init__(self, root):
    self.root = root

  def _dir(self, run, snap):
    return os.path.join(self.root, run, snap)

  def save(self, run, snap, arrays):
    import numpy as np  # pylint: disable=g-import-not-at-top
    d = self._dir(run, snap)
    os.makedirs(d, exist_ok=True)
    for k, v in arrays.items():
      np.save(os.path.join(d, k.replace("/", "|") + ".npy"), np.asarray(v))

  def keys(self, run, snap):
    return sorted(f[:-4].replace("|", "/") for f in os.listdir(self._dir(run, snap)))

  def load(self, run, snap, key):
    import numpy as np  # pylint: disable=g-import-not-at-top
    return np.load(os.path.join(self._dir(run, snap), key.replace("/", "|") + ".npy"),
                   mmap_mode="r")


# ---------------------------------------------------------------------------------------------
# The initial state and the inputs.


def perturb_and_calibrate(torch, modules, calibrate, gen):
  """Moves every parameter off its init value, then sets realistic BatchNorm running stats.

  BatchNorm scale ×(1 + 0.1·N), shift 0.1·N, embedding tables + 0.05·N; running statistics from
  one train-mode pass (`calibrate()`) with momentum None (cumulative average), under no_grad.
  """
  bns = []
  with torch.no_grad():
    for module in modules:
      for m in module.modules():
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):  # pylint: disable=protected-access
          m.weight.mul_(1 + 0.1 * torch.randn(m.weight.shape, generator=gen))
          m.bias.copy_(0.1 * torch.randn(m.bias.shape, generator=gen))
          bns.append((m, m.momentum))
          m.reset_running_stats()
          m.momentum = None
        elif isinstance(m, torch.nn.Embedding):
          m.weight.add_(0.05 * torch.randn(m.weight.shape, generator=gen))
    for module in modules:
      module.train()
    calibrate()
  for m, momentum in bns:
    m.momentum = momentum


def make_inputs(torch, a, num_classes, num_timesteps, gen):
  """Batches [(x NCHW float32, labels)] and per-iteration draws [(t' int64, ε float32)]."""
  batches = [(torch.randn(a.batch, 3, 224, 224, generator=gen),
              torch.randint(0, num_classes, (a.batch,), generator=gen))
             for _ in range(a.num_batches)]
  draws = [(torch.randint(0, num_timesteps, (a.batch // 2 + 1,), generator=gen),
            torch.randn(a.batch, num_classes, generator=gen)) for _ in range(a.iterations)]
  return batches, draws


@contextlib.contextmanager
def injected_draws(torch, half, noise, calls):
  """The official iteration's torch.randint and torch.randn_like return `half` and `noise`
  (each must be called exactly once, with the official shapes); `calls` counts the calls."""
  randint, randn_like = torch.randint, torch.randn_like

  def fake_randint(*args, size=None, **kwargs):
    calls["randint"] += 1
    if tuple(size) != tuple(half.shape):
      raise AssertionError(f"official torch.randint size {size}, expected {tuple(half.shape)}")
    return half.clone()

  def fake_randn_like(like, *args, **kwargs):
    calls["randn_like"] += 1
    if tuple(like.shape) != tuple(noise.shape):
      raise AssertionError(f"official torch.randn_like of {tuple(like.shape)}, expected "
                           f"{tuple(noise.shape)}")
    return noise.to(like.dtype).clone()

  torch.randint, torch.randn_like = fake_randint, fake_randn_like
  try:
    yield
  finally:
    torch.randint, torch.randn_like = randint, randn_like


# ---------------------------------------------------------------------------------------------
# The official runs (float32 and float64).


def official_snapshot(model, dcg, ema_shadow, maps):
  """The compared state of the official objects in our layout (native dtype)."""
  model_sd, dcg_sd = model.state_dict(), dcg.state_dict()
  out = {}
  out.update({f"denoiser/{k}": v for k, v in to_our_layout(model_sd, maps["denoiser"]).items()})
  out.update({f"dcg/{k}": v for k, v in to_our_layout(dcg_sd, maps["dcg"]).items()})
  if ema_shadow is not None:
    out.update({f"ema/{k}": v for k, v in to_our_layout(ema_shadow, maps["ema"]).items()})
  return out


def official_optimizer_snapshot(model, dcg, optimizer, aux_optimizer, maps):
  """The official Adam (denoiser) and AMSGrad (DCG) moments in our layout: keys
  'adam_mu/params/...', 'adam_nu/...', 'amsgrad_mu/...', 'amsgrad_nu/...', 'amsgrad_nu_max/...'."""
  out = {}
  for module, opt, prefix, mapping, fields in (
      (model, optimizer, "adam", maps["ema"], (("mu", "exp_avg"), ("nu", "exp_avg_sq"))),
      (dcg, aux_optimizer, "amsgrad", maps["dcg_params"],
       (("mu", "exp_avg"), ("nu", "exp_avg_sq"), ("nu_max", "max_exp_avg_sq")))):
    for ours, theirs in fields:
      # No state yet (before the optimiser's first step): the moments are zero.
      tensors = {name: opt.state[p][theirs] if theirs in opt.state[p] else p.detach() * 0
                 for name, p in module.named_parameters()}
      out.update({f"{prefix}_{ours}/{k}": v for k, v in to_our_layout(tensors, mapping).items()})
  return out


def subsample(snapshot, prefixes=("denoiser/params", "dcg/params")):
  """{prefix: strided subsample of every tensor under it, concatenated, float64}."""
  import numpy as np  # pylint: disable=g-import-not-at-top
  out = {}
  for prefix in prefixes:
    keys = sorted(k for k in snapshot if k.startswith(prefix))
    out[prefix] = np.concatenate([np.asarray(snapshot[k], np.float64).ravel()[::STRIDE]
                                  for k in keys])
  return out


def run_official(off, a, dtype_name, init, batches, draws, maps, store):
  """Warm-up step + a.iterations joint iterations of the official code in one dtype."""
  import numpy as np  # pylint: disable=g-import-not-at-top
  from experiments.fidelity import official_code  # pylint: disable=g-import-not-at-top
  torch = off.torch
  dtype = {"float32": torch.float32, "float64": torch.float64}[dtype_name]
  torch.set_default_dtype(dtype)
  try:
    config, args, runner, model = official_code.build(off, a.official_dir, a.official_config)
    model.load_state_dict(init["model"])
    runner.cond_pred_model.load_state_dict(init["dcg"])
    state = official_code.TrainState(off, runner, model, config)  # Adam, AMSGrad, EMA.register
    state.epoch, state.i, state.len_loader = LR_EPOCH, 0, STEPS_PER_EPOCH
    run = f"official_{dtype_name}"
    cast = lambda x: x.to(dtype)  # noqa: E731
    rows, drift = [], []
    x, y = batches[0]
    t0 = time.perf_counter()
    dcg_loss = official_code.official_warmup_step(off, runner, config, state, cast(x), y)
    warm_seconds = time.perf_counter() - t0
    snap = official_snapshot(model, runner.cond_pred_model, None, maps)
    store.save(run, "warmup", {k: v for k, v in snap.items() if k.startswith("dcg/")})
    store.save(run, "warmup_scalars", {"dcg_loss": np.float64(dcg_loss)})
    # The joint iterations start from the same initial state, with fresh optimiser states and
    # the EMA registered there (Adam's first step is ±lr wherever |g| >> eps, so carrying the
    # warm-up's float32 sign noise into the joint stage would only blur its comparison).
    model.load_state_dict(init["model"])
    runner.cond_pred_model.load_state_dict(init["dcg"])
    state = official_code.TrainState(off, runner, model, config)
    state.epoch, state.i, state.len_loader = LR_EPOCH, 0, STEPS_PER_EPOCH
    for k in range(a.iterations):
      x, y = batches[k % len(batches)]
      half, noise = draws[k]
      record, calls = {}, {"randint": 0, "randn_like": 0}
      t0 = time.perf_counter()
      with injected_draws(torch, half, noise, calls):
        _, aux_loss = official_code.official_train_iteration(off, runner, model, config, args,
                                                             state, cast(x), y, record=record)
      seconds = time.perf_counter() - t0
      if calls != {"randint": 1, "randn_like": 1}:
        raise AssertionError(f"the official iteration drew {calls}, expected one of each")
      row = {"iteration": k + 1, "seconds": seconds, "lr": float(record["lr"]),
             "dcg_loss": float(aux_loss),
             **{n: float(record[n].detach()) for n in ("mse", "mmd_global", "mmd_local",
                                                       "loss", "grad_norm")}}
      rows.append(row)
      snap = official_snapshot(model, runner.cond_pred_model, state.ema_helper.shadow, maps)
      drift.append(subsample(snap))
      if k == 0 or k == a.iterations - 1:
        name = "joint1" if k == 0 else "final"
        store.save(run, name, snap)
        store.save(run, name + "_scalars", {n: np.float64(row[n]) for n in
                                            ("mse", "mmd_global", "mmd_local", "loss",
                                             "grad_norm", "dcg_loss")})
        if k == 0:
          store.save(run, "draws", {"t": record["t"].numpy(), "e": record["e"].numpy()})
      print(f"  {run} iteration {k + 1}: loss {row['loss']:.6f} dcg {row['dcg_loss']:.6f} "
            f"({seconds:.1f} s)", flush=True)
    del model, runner, state
    gc.collect()
    return {"rows": rows, "drift": drift, "warmup_seconds": warm_seconds}
  finally:
    torch.set_default_dtype(torch.float32)


# ---------------------------------------------------------------------------------------------
# Ours.


def load_config(path):
  """get_config() of a config file of ours (path relative to the repository root or absolute)."""
  import importlib.util  # pylint: disable=g-import-not-at-top
  spec = importlib.util.spec_from_file_location("parity_config", os.path.join(_REPO, path))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config()


def our_setup(a, init):
  """`our_training` for the harness's config and batch."""
  config = load_config(a.config)
  config.training.batch_size = a.batch
  if a.conv_impl:
    config.model.conv_impl = a.conv_impl
  return our_training(config, init["model"], init["dcg"])


def our_training(config, model_state_dict, dcg_state_dict):
  """(models, config, state, warm-up step, joint step with draws, LR of the k-th joint step)
  from official-format state_dicts, through our converter; the steps are jitted production
  step bodies (`train.make_train_steps`), the denoiser's Adam at the official schedule's epoch
  LR_EPOCH (fresh state)."""
  import jax  # pylint: disable=g-import-not-at-top
  from diffmic_jax import convert  # pylint: disable=g-import-not-at-top
  from diffmic_jax.diffusion import models as models_lib  # pylint: disable=g-import-not-at-top
  from diffmic_jax.run import optim  # pylint: disable=g-import-not-at-top
  from diffmic_jax.training import train  # pylint: disable=g-import-not-at-top
  from diffmic_jax.run import train_state  # pylint: disable=g-import-not-at-top
  state = convert.build_official_state(config, model_state_dict, dcg_state_dict)
  models = models_lib.create_models(config)
  guidance_tx, _, schedule = train_state.build_optimizers(config, STEPS_PER_EPOCH)
  o = config.optim
  offset = LR_EPOCH * STEPS_PER_EPOCH
  # Fresh Adam state whose schedule starts at the official position (epoch LR_EPOCH, i = 0).
  shifted = lambda count: schedule(count + offset)  # noqa: E731
  denoiser_tx = optim.denoiser_optimizer(shifted, o.b1, o.b2, o.eps, o.grad_clip)
  steps = train.make_train_steps(models, config, guidance_tx, denoiser_tx, schedule, 0)
  return (models, config, state, jax.jit(steps["warmup"]), jax.jit(steps["joint_draws"]),
          shifted)


def our_snapshot(state, with_optimizer=False):
  """Our compared state, keyed as `official_snapshot` (and `official_optimizer_snapshot`)."""
  import numpy as np  # pylint: disable=g-import-not-at-top
  import optax  # pylint: disable=g-import-not-at-top
  from diffmic_jax.nn import pretrained  # pylint: disable=g-import-not-at-top
  trees = [("denoiser", state.denoiser), ("dcg", state.guidance), ("ema", {"params": state.ema})]
  if with_optimizer:
    get = optax.tree_utils.tree_get
    trees += [("adam_mu", {"params": get(state.denoiser_opt, "mu")}),
              ("adam_nu", {"params": get(state.denoiser_opt, "nu")}),
              ("amsgrad_mu", {"params": get(state.guidance_opt, "mu")}),
              ("amsgrad_nu", {"params": get(state.guidance_opt, "nu")}),
              ("amsgrad_nu_max", {"params": get(state.guidance_opt, "nu_max")})]
  out = {}
  for name, tree in trees:
    for k, v in pretrained.flatten(tree).items():
      out[f"{name}/{k}"] = np.asarray(v)
  return out


def run_ours(a, init, batches, draws, store):
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  from diffmic_jax.diffusion import diffusion  # pylint: disable=g-import-not-at-top
  models, _, state, warmup, joint, lr = our_setup(a, init)
  images = lambda x: jnp.asarray(x.numpy().transpose(0, 2, 3, 1))  # noqa: E731
  rows, drift = [], []
  x, y = batches[0]
  t0 = time.perf_counter()
  state, metrics = warmup(state, {"image": images(x), "label": jnp.asarray(y.numpy())})
  metrics = jax.device_get(metrics)
  warm_seconds = time.perf_counter() - t0
  snap = our_snapshot(state)
  store.save("ours", "warmup", {k: v for k, v in snap.items() if k.startswith("dcg/")})
  store.save("ours", "warmup_scalars", {"dcg_loss": np.float64(metrics["dcg_loss"])})
  _, _, state, _, _, _ = our_setup(a, init)  # the joint stage restarts from the initial state
  for k in range(a.iterations):
    x, y = batches[k % len(batches)]
    half, noise = draws[k]
    step_draws = {"t": diffusion.antithetic_pairs(jnp.asarray(half.numpy()), a.batch,
                                                  models.num_timesteps),
                  "e": jnp.asarray(noise.numpy())}
    t0 = time.perf_counter()
    state, metrics = joint(state, {"image": images(x), "label": jnp.asarray(y.numpy())},
                           step_draws)
    metrics = jax.device_get(metrics)
    seconds = time.perf_counter() - t0
    row = {"iteration": k + 1, "seconds": seconds, "lr": float(lr(k)),
           **{n: float(metrics[n]) for n in ("mse", "mmd_global", "mmd_local", "loss",
                                             "grad_norm", "dcg_loss")}}
    rows.append(row)
    snap = our_snapshot(state)
    drift.append(subsample(snap))
    if k == 0 or k == a.iterations - 1:
      name = "joint1" if k == 0 else "final"
      store.save("ours", name, snap)
      store.save("ours", name + "_scalars", {n: np.float64(row[n]) for n in
                                             ("mse", "mmd_global", "mmd_local", "loss",
                                              "grad_norm", "dcg_loss")})
      if k == 0:
        store.save("ours", "draws", {"t": np.asarray(step_draws["t"]),
                                     "e": np.asarray(step_draws["e"])})
    print(f"  ours iteration {k + 1}: loss {row['loss']:.6f} dcg {row['dcg_loss']:.6f} "
          f"({seconds:.1f} s)", flush=True)
  return {"rows": rows, "drift": drift, "warmup_seconds": warm_seconds}


# ---------------------------------------------------------------------------------------------
# Comparison.

# (stage, group, snapshot, key prefix, compared as the change from the initial state?)
GROUPS = [
    ("warmup", "loss_dcg", "warmup_scalars", "dcg_loss", False),
    ("warmup", "dcg_params", "warmup", "dcg/params/", True),
    ("warmup", "dcg_batch_stats", "warmup", "dcg/batch_stats/", True),
    ("joint", "draws_t", "draws", "t", False),
    ("joint", "draws_e", "draws", "e", False),
    ("joint", "loss_mse", "joint1_scalars", "mse", False),
    ("joint", "loss_mmd_global", "joint1_scalars", "mmd_global", False),
    ("joint", "loss_mmd_local", "joint1_scalars", "mmd_local", False),
    ("joint", "loss_total", "joint1_scalars", "loss", False),
    ("joint", "grad_norm", "joint1_scalars", "grad_norm", False),
    ("joint", "denoiser_params", "joint1", "denoiser/params/", True),
    ("joint", "ema_shadow", "joint1", "ema/params/", True),
    ("joint", "denoiser_batch_stats", "joint1", "denoiser/batch_stats/", True),
    ("joint", "loss_dcg", "joint1_scalars", "dcg_loss", False),
    ("joint", "dcg_params", "joint1", "dcg/params/", True),
    ("joint", "dcg_batch_stats", "joint1", "dcg/batch_stats/", True),
]
FINAL_GROUPS = [("final", g, "final" if s == "joint1" else "final_scalars", p, d)
                for _, g, s, p, d in GROUPS if s in ("joint1", "joint1_scalars")]


def _initial(init_ours, key):
  """The common initial value of a state tensor (the EMA starts at the parameters, optimiser
  moments at 0)."""
  if key.startswith(("adam_", "amsgrad_")):
    return 0.0
  if key.startswith("ema/"):
    key = "denoiser/" + key[len("ema/"):]
  return init_ours[key]


def tensor_errors(ours, off32, off64):
  """Squared norms of the differences (float64) and the max abs error of ours vs off32."""
  import numpy as np  # pylint: disable=g-import-not-at-top
  o, a32, a64 = (np.asarray(v, np.float64) for v in (ours, off32, off64))
  sq = lambda d: float(np.sum(np.square(d)))  # noqa: E731
  return {"max_abs_vs_official32": float(np.max(np.abs(o - a32))) if o.size else 0.0,
          "sq_vs_official32": sq(o - a32), "sq_vs_official64": sq(o - a64),
          "sq_spread": sq(a32 - a64), "sq_norm": sq(a64)}


def _relative(sq_diff, sq_norm):
  if sq_norm > 0:
    return math.sqrt(sq_diff / sq_norm)
  return 0.0 if sq_diff == 0 else math.inf


def compare(store, init_ours, groups):
  """`compare_arrays` on the runs in a `Store`."""
  return compare_arrays(store.load, store.keys, init_ours, groups)


def compare_arrays(fetch, keys_of, init_ours, groups):
  """Per-group rows (pass/fail) and per-tensor rows (detail).

  Args:
    fetch: (run, snapshot, key) -> array; runs 'ours', 'official_float32', 'official_float64'.
    keys_of: (run, snapshot) -> the keys of that snapshot.
    init_ours: {key: the common initial value} (our layout).
    groups: [(stage, group, snapshot, key or key prefix ending in '/', compare the change from
      the initial state?)].

  Everything is normwise over the group (all its tensors concatenated): Adam's and AMSGrad's
  first step is ±lr wherever |g| >> eps, so the few elements whose gradient is below float32
  noise (and every element of a structurally-zero gradient, such as the bias before a
  train-mode BatchNorm) take a random sign in any float32 run; per tensor that makes small
  tensors' errors a lottery, per group it is weighed by its share of the update.
  """
  import numpy as np  # pylint: disable=g-import-not-at-top
  rows, tensors = [], []
  for stage, group, snap, prefix, as_change in groups:
    keys = [k for k in keys_of("ours", snap) if k == prefix or
            (prefix.endswith("/") and k.startswith(prefix))]
    if not keys:
      raise KeyError(f"no tensors for {stage}/{group} ({prefix}) in snapshot {snap}")
    total = {"sq_vs_official32": 0.0, "sq_vs_official64": 0.0, "sq_spread": 0.0, "sq_norm": 0.0}
    max_abs = 0.0
    for key in keys:
      vals = [np.asarray(fetch(run, snap, key), np.float64)
              for run in ("ours", "official_float32", "official_float64")]
      if as_change:
        start = np.asarray(_initial(init_ours, key), np.float64)
        vals = [v - start for v in vals]
      err = tensor_errors(*vals)
      for name in total:
        total[name] += err[name]
      max_abs = max(max_abs, err["max_abs_vs_official32"])
      tensors.append({"stage": stage, "group": group, "tensor": key,
                      "max_abs_vs_official32": err["max_abs_vs_official32"],
                      "rel_vs_official32": _relative(err["sq_vs_official32"], err["sq_norm"]),
                      "rel_vs_official64": _relative(err["sq_vs_official64"], err["sq_norm"]),
                      "spread_official32_vs_64": _relative(err["sq_spread"], err["sq_norm"]),
                      "norm_official64": math.sqrt(err["sq_norm"])})
    rows.append({
        "stage": stage, "group": group, "snapshot": snap, "tensors": len(keys),
        "max_abs_vs_official32": max_abs,
        "rel_vs_official32": _relative(total["sq_vs_official32"], total["sq_norm"]),
        "rel_vs_official64": _relative(total["sq_vs_official64"], total["sq_norm"]),
        "spread_official32_vs_64": _relative(total["sq_spread"], total["sq_norm"]),
        "norm_official64": math.sqrt(total["sq_norm"]), "_total": total,
        "compared": "change from the initial state" if as_change else "value"})
  # A scalar's own spread is a single, possibly lucky, sample of a float32 rounding error: the
  # yardstick of every scalar output (loss terms, gradient norm, DCG loss: the snapshots named
  # *_scalars) is at least the pooled spread of all of them.
  pooled = [0.0, 0.0]
  for r in rows:
    if r["snapshot"].endswith(SCALARS):
      pooled[0] += r["_total"]["sq_spread"]
      pooled[1] += r["_total"]["sq_norm"]
  for r in rows:
    del r["_total"]
    yardstick = r["spread_official32_vs_64"]
    if r["snapshot"].endswith(SCALARS):
      yardstick = max(yardstick, _relative(*pooled))
    r["tolerance"] = FACTOR * max(yardstick, FLOOR)
    r["passed"] = r["rel_vs_official64"] <= r["tolerance"]
  return rows, tensors


def drift_rows(runs, init_sub):
  """Per iteration: ‖θ_k − θ_0‖ (on the subsample) per run and the distances between runs,
  relative to the official float64 drift."""
  import numpy as np  # pylint: disable=g-import-not-at-top
  out = []
  for k in range(len(runs["ours"]["drift"])):
    row = {"iteration": k + 1}
    for prefix in init_sub:
      d = {run: runs[run]["drift"][k][prefix] - init_sub[prefix] for run in runs}
      ref = float(np.linalg.norm(d["official_float64"]))
      name = prefix.split("/")[0]
      for run in runs:
        row[f"{name}_drift_{run}"] = float(np.linalg.norm(d[run]))
      row[f"{name}_rel_ours_vs_official64"] = float(
          np.linalg.norm(d["ours"] - d["official_float64"])) / ref
      row[f"{name}_rel_ours_vs_official32"] = float(
          np.linalg.norm(d["ours"] - d["official_float32"])) / ref
      row[f"{name}_spread_official32_vs_64"] = float(
          np.linalg.norm(d["official_float32"] - d["official_float64"])) / ref
    out.append(row)
  return out


TRAJECTORY_SCALARS = ("loss", "mse", "mmd_global", "mmd_local", "grad_norm", "dcg_loss")


def trajectory_rows(iterations):
  """Per scalar, over all iterations: how far ours and the official float32 run are from the
  official float64 run (relative), as root mean square and median, and in how many iterations
  ours is the closer one.

  After a few iterations float32 round-off has been amplified into a different trajectory for
  any float32 run, so the last iteration's distance is one draw from a wide distribution; two
  float32 runs of the same computation are equally far from float64 on average.

  Args:
    iterations: {'ours' | 'official_float32' | 'official_float64': [per-iteration row with
      the keys of TRAJECTORY_SCALARS]}.
  """
  import numpy as np  # pylint: disable=g-import-not-at-top
  out = []
  for name in TRAJECTORY_SCALARS:
    ours, off32, off64 = (np.array([row[name] for row in iterations[run]], np.float64)
                          for run in ("ours", "official_float32", "official_float64"))
    rel_ours, rel_off32 = (np.abs(v - off64) / np.abs(off64) for v in (ours, off32))
    out.append({"scalar": name, "iterations": len(off64),
                "rms_rel_ours_vs_official64": float(np.sqrt(np.mean(rel_ours ** 2))),
                "rms_rel_official32_vs_official64": float(np.sqrt(np.mean(rel_off32 ** 2))),
                "median_rel_ours_vs_official64": float(np.median(rel_ours)),
                "median_rel_official32_vs_official64": float(np.median(rel_off32)),
                "ours_closer": int(np.sum(rel_ours < rel_off32))})
  return out


def format_trajectory(rows):
  lines = [f"{'scalar':12s} {'rms: ours':>10s} {'official32':>10s} {'median: ours':>13s} "
           f"{'official32':>10s} {'ours closer':>12s}"]
  for r in rows:
    lines.append(f"{r['scalar']:12s} {r['rms_rel_ours_vs_official64']:10.3e} "
                 f"{r['rms_rel_official32_vs_official64']:10.3e} "
                 f"{r['median_rel_ours_vs_official64']:13.3e} "
                 f"{r['median_rel_official32_vs_official64']:10.3e} "
                 f"{r['ours_closer']:5d} of {r['iterations']:<3d}")
  return "\n".join(lines)


def format_table(rows):
  head = (f"{'stage':7s} {'group':22s} {'n':>4s} {'max abs (vs off32)':>18s} "
          f"{'rel vs off32':>12s} {'rel vs off64':>12s} {'off32-vs-64':>12s} {'result':>6s}")
  lines = [head]
  for r in rows:
    lines.append(f"{r['stage']:7s} {r['group']:22s} {r['tensors']:4d} "
                 f"{r['max_abs_vs_official32']:18.3e} {r['rel_vs_official32']:12.3e} "
                 f"{r['rel_vs_official64']:12.3e} {r['spread_official32_vs_64']:12.3e} "
                 f"{'pass' if r['passed'] else 'FAIL':>6s}")
  return "\n".join(lines)


def plot(path, runs, drift):
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  fig, axes = plt.subplots(2, 3, figsize=(15, 8))
  styles = {"official_float64": ("k", "-", "official float64"),
            "official_float32": ("tab:blue", "--", "official float32"),
            "ours": ("tab:orange", ":", "ours (float32)")}
  for ax, term in zip(axes.flat, ("loss", "mse", "mmd_global", "dcg_loss")):
    for run, (color, ls, label) in styles.items():
      rows = runs[run]["rows"]
      ax.plot([r["iteration"] for r in rows], [r[term] for r in rows], color=color, ls=ls,
              marker="o", ms=3, label=label)
    ax.set_title(term)
    ax.set_xlabel("iteration")
  axes.flat[0].legend()
  for ax, name in zip(axes.flat[4:], ("denoiser", "dcg")):
    its = [r["iteration"] for r in drift]
    ax.semilogy(its, [r[f"{name}_rel_ours_vs_official64"] for r in drift], color="tab:orange",
                label="‖ours − off64‖ / ‖Δθ off64‖")
    ax.semilogy(its, [r[f"{name}_spread_official32_vs_64"] for r in drift], color="tab:blue",
                ls="--", label="‖off32 − off64‖ / ‖Δθ off64‖")
    ax.set_title(f"{name} parameter drift: distance between runs")
    ax.set_xlabel("iteration")
    ax.legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(path, dpi=100)
  plt.close(fig)


# ---------------------------------------------------------------------------------------------


def main(argv=None):
  a = parse_args(argv)
  a.official_dir = os.path.abspath(a.official_dir)
  check_inputs(a)
  multi = "false" if a.threads == 1 else "true"
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                             f" --xla_cpu_multi_thread_eigen={multi}"
                             f" intra_op_parallelism_threads={a.threads}").strip()
  import numpy as np  # pylint: disable=g-import-not-at-top
  import torch  # pylint: disable=g-import-not-at-top
  import jax  # pylint: disable=g-import-not-at-top
  from diffmic_jax import convert  # pylint: disable=g-import-not-at-top
  from diffmic_jax.platform import files  # pylint: disable=g-import-not-at-top
  from diffmic_jax.platform import host  # pylint: disable=g-import-not-at-top
  from experiments.fidelity import official_code  # pylint: disable=g-import-not-at-top
  start = time.perf_counter()
  torch.set_num_threads(a.threads)
  torch.manual_seed(a.seed)
  off = official_code.import_official(a.official_dir)
  config, _, runner, model = official_code.build(off, a.official_dir, a.official_config)
  gen = torch.Generator().manual_seed(a.seed)
  dcg = runner.cond_pred_model
  num_classes, num_timesteps = config.data.num_classes, runner.num_timesteps

  def calibrate():
    xc = torch.randn(8, 3, 224, 224, generator=gen)
    yc = torch.softmax(torch.randn(8, num_classes, generator=gen), -1)
    tc = torch.randint(0, num_timesteps, (8,), generator=gen)
    dcg(xc)
    model(xc, yc, tc, yc)

  perturb_and_calibrate(torch, (model, dcg), calibrate, gen)
  init = {"model": {k: v.detach().clone() for k, v in model.state_dict().items()},
          "dcg": {k: v.detach().clone() for k, v in dcg.state_dict().items()}}
  del model, runner, dcg
  gc.collect()
  batches, draws = make_inputs(torch, a, num_classes, num_timesteps, gen)

  # Our converter builds our initial state; its flat arrays are the common starting point.
  from diffmic_jax.run import train_state  # pylint: disable=g-import-not-at-top
  from diffmic_jax.diffusion import models as models_lib  # pylint: disable=g-import-not-at-top
  our_config = load_config(a.config)
  abstract = train_state.abstract_train_state(models_lib.create_models(our_config), our_config)
  maps = official_maps(abstract)
  init_state = convert.build_official_state(our_config, init["model"], init["dcg"])
  init_ours = our_snapshot(init_state)
  init_sub = subsample(init_ours)
  del init_state
  gc.collect()

  root = a.keep_records or tempfile.mkdtemp(prefix="diffmic_parity_")
  store = Store(root)
  runs = {}
  try:
    for dtype_name in ("float32", "float64"):
      print(f"official {dtype_name}: warm-up step + {a.iterations} joint iterations", flush=True)
      runs[f"official_{dtype_name}"] = run_official(off, a, dtype_name, init, batches, draws,
                                                    maps, store)
    print(f"ours: warm-up step + {a.iterations} joint iterations", flush=True)
    runs["ours"] = run_ours(a, init, batches, draws, store)
    rows, tensors = compare(store, init_ours, GROUPS)
    final_rows, final_tensors = compare(store, init_ours, FINAL_GROUPS) if a.iterations > 1 \
        else ([], [])
  finally:
    if not a.keep_records:
      shutil.rmtree(root, ignore_errors=True)
  drift = drift_rows(runs, init_sub)
  wall = time.perf_counter() - start
  print("\none official iteration (DCG warm-up step, then one joint iteration):")
  print(format_table(rows))
  if final_rows:
    print(f"\nafter {a.iterations} joint iterations:")
    print(format_table(final_rows))
  print("\nper iteration (loss: ours / official float32 / official float64; denoiser and DCG "
        "parameter distance ours vs official float64, relative to the drift):")
  for r, o32, o64, d in zip(runs["ours"]["rows"], runs["official_float32"]["rows"],
                            runs["official_float64"]["rows"], drift):
    print(f"  {r['iteration']:3d}: loss {r['loss']:.7f} / {o32['loss']:.7f} / {o64['loss']:.7f}"
          f"   dcg {r['dcg_loss']:.7f} / {o32['dcg_loss']:.7f} / {o64['dcg_loss']:.7f}"
          f"   drift dist {d['denoiser_rel_ours_vs_official64']:.2e} (off32 "
          f"{d['denoiser_spread_official32_vs_64']:.2e}), dcg "
          f"{d['dcg_rel_ours_vs_official64']:.2e} (off32 {d['dcg_spread_official32_vs_64']:.2e})")
  iterations = {run: runs[run]["rows"] for run in runs}
  trajectory = trajectory_rows(iterations) if a.iterations > 1 else []
  if trajectory:
    print(f"\nover the {a.iterations} iterations, distance to official float64 (relative):")
    print(format_trajectory(trajectory))
  all_rows = rows + final_rows
  passed = sum(r["passed"] for r in all_rows)
  failed = len(all_rows) - passed
  png = os.path.splitext(a.json)[0] + ".png"
  plot(png, runs, drift)
  result = {
      "what": "official DiffMIC training iteration vs ours, same state, batch and draws",
      "official_repo": "scott-yjyang/DiffMIC",
      "official_commit": a.official_commit or official_code.tree_commit(a.official_dir),
      "torch": torch.__version__, "torchvision": off.torchvision.__version__,
      "jax": jax.__version__, "cpu": host.cpu_description(), "threads": a.threads,
      "wall_seconds": wall,
      "config": {"official": a.official_config, "ours": a.config, "batch": a.batch,
                 "iterations": a.iterations, "num_batches": a.num_batches, "seed": a.seed,
                 "conv_impl": a.conv_impl or "config default",
                 "lr_epoch": LR_EPOCH, "steps_per_epoch": STEPS_PER_EPOCH},
      "tolerance": {"factor": FACTOR, "floor": FLOOR,
                    "rule": "per group, normwise over its tensors: ‖ours − off64‖/‖off64‖ <= "
                            "factor·max(‖off32 − off64‖/‖off64‖, floor), on the change from the "
                            "initial state for state tensors"},
      "patches": official_code.PATCHES, "import_stubs": official_code.IMPORT_STUBS,
      "groups": rows, "final_groups": final_rows, "tensors": tensors + final_tensors,
      "iterations": iterations, "trajectory": trajectory, "drift": drift,
      "passed": passed, "failed": failed, "png": png,
  }
  files.write_json(a.json, result, indent=1)
  print(f"\nwrote {a.json} and {png}; wall time {wall:.0f} s on {host.cpu_description()['model']}")
  print(f"{passed} passed, {failed} failed")
  return 1 if failed else 0


if __name__ == "__main__":
  sys.exit(main())
