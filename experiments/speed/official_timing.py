#!/usr/bin/env python
"""Timing harness for the OFFICIAL PyTorch DiffMIC code (scott-yjyang/DiffMIC), CPU only.

Writes its results as JSON in the schema of diffmic-jax's `experiments/speed/benchmark.py`, so
that `python experiments/speed/benchmark.py --compare-official official.json` can compute
speed-ups on the machine at hand. The official code itself never enters this repository: export
it to a folder outside it and pass that folder as --official-dir; this script imports it from
there.

What it times (paper configuration for HAM10000: the official configs/isic.yml, C=7, 224x224,
feature width 6144, T=1000, float32; random input tensors, random labels):

* inference exactly as the official `Diffusion.test()` body runs one batch: two DCG calls
  (`compute_guiding_prediction` twice, under no_grad, model and DCG in eval mode), then the
  official `p_sample_loop` (rho(x) recomputed at every step; the truncated chain on the
  1000-step table), softmax, per-batch accuracy and quadratic kappa (both as in test());
* training stage "joint": the body of the official `Diffusion.train()` epoch loop for one batch
  (LR schedule, DCG forward in eval mode, antithetic t, three q_sample streams, three
  ConditionalModel forwards, MSE + 0.5 (MMD_g + MMD_l), zero_grad, backward, clip_grad_norm_
  1.0, Adam step, EMA update, then the joint DCG step: train mode, CE on the fused logits,
  AMSGrad step via the official `nonlinear_guidance_model_train_step`);
* training stage "warmup": one DCG warm-up step (train mode, `nonlinear_guidance_model_train_step`
  with the AMSGrad aux optimiser), as in the official pre-training loop;
* a [32, 6144] x [6144, 6144] float32 torch.mm probe.

The official code is imported, and its iterations run, by experiments/fidelity/official_code.py
(shared with experiments/fidelity/official_training_parity.py): only the two CPU patches of
shared/spec/PERF_ANCHOR.md are applied, at import time (the official files are not edited); see
official_code.PATCHES and official_code.IMPORT_STUBS.

Usage (needs torch and torchvision, which diffmic-jax itself never imports; the measurement
wants a quiet machine, all cores):
  git clone https://github.com/scott-yjyang/DiffMIC /tmp/DiffMIC   # outside this repository
  python experiments/speed/official_timing.py --official-dir /tmp/DiffMIC --threads 2 \
      --json /tmp/official.json                                     # about 12 min on 2 cores
  python experiments/speed/benchmark.py --compare-official /tmp/official.json
A quick check that it runs: --threads 1 --repeats 1. With a torchvision installed apart
(`pip install --no-deps --target DIR torchvision==...`), add --extra-path DIR.
"""

import argparse
import gc
import os
import resource
import statistics
import sys
import time
import warnings

# diffmic_jax.platform.host (no JAX inside) gives the same CPU description and peak-memory probe as
# experiments/speed/benchmark.py, so --compare-official can tell whether both ran on one CPU model;
# diffmic_jax.platform.files the same atomic JSON write (a killed run leaves no half file).
_REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
if _REPO not in sys.path:
  sys.path.insert(0, _REPO)
from diffmic_jax.platform import files  # pylint: disable=g-import-not-at-top,wrong-import-position
from diffmic_jax.platform import host  # pylint: disable=g-import-not-at-top,wrong-import-position
from experiments.fidelity import official_code  # pylint: disable=g-import-not-at-top,wrong-import-position,line-too-long

def ru_maxrss_bytes():
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def parse_args():
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--threads", type=int, default=2, help="torch.set_num_threads (default 2)")
  p.add_argument("--repeats", type=int, default=3,
                 help="timed calls per row after one warm-up call (default 3)")
  p.add_argument("--only", choices=["inference", "training"], default=None)
  p.add_argument("--json", default="official.json", help="output path")
  p.add_argument("--official-dir", required=True,
                 help="the official repository's tree, outside this repository")
  p.add_argument("--extra-path", default=None,
                 help="a folder put first on sys.path (e.g. a torchvision installed with "
                      "pip --target)")
  p.add_argument("--config", default="configs/isic.yml",
                 help="official config, relative to --official-dir (default HAM10000/ISIC)")
  p.add_argument("--steps", default="100",
                 help="comma-separated chain lengths N for the official truncated sampler "
                      "(default 100)")
  p.add_argument("--batches", default="32,1", help="inference batch sizes (default 32,1)")
  p.add_argument("--train-batch", type=int, default=32, help="training batch (default 32)")
  p.add_argument("--stages", default="warmup,joint", help="training stages (default both)")
  p.add_argument("--matmul-repeats", type=int, default=20)
  p.add_argument("--official-commit", default=None,
                 help="commit of the exported tree (default: `git rev-parse HEAD` there, or "
                      "its OFFICIAL_COMMIT file)")
  p.add_argument("--seed", type=int, default=1234, help="torch seed (official default 1234)")
  return p.parse_args()


# ---------------------------------------------------------------------------------------------
# The official work, one batch
# ---------------------------------------------------------------------------------------------

def official_test_batch(off, runner, model, config, images, target, n_steps, phases=None):
  """The per-batch body of the official Diffusion.test() (diffusion_trainer.py), with
  test_num_timesteps = n_steps."""
  torch, U, D = off.torch, off.utils, off.diffusion_utils
  model.eval()
  runner.cond_pred_model.eval()
  t0 = time.perf_counter()
  images_unflat = images.to(runner.device)
  images = images.to(runner.device)
  target = target.to(runner.device)
  target_vec = torch.nn.functional.one_hot(
      target, num_classes=config.data.num_classes).float().to(runner.device)  # noqa: F841
  with torch.no_grad():
    target_pred, y_global, y_local = runner.compute_guiding_prediction(images_unflat)
    target_pred = target_pred.softmax(dim=1)
    y_T_mean = target_pred
    if config.diffusion.noise_prior:
      y_T_mean = torch.zeros(target_pred.shape).to(target_pred.device)
    if not config.diffusion.noise_prior:
      target_pred, y_global, y_local = runner.compute_guiding_prediction(images_unflat)
      target_pred = target_pred.softmax(dim=1)
    t1 = time.perf_counter()
    label_t_0 = D.p_sample_loop(model, images, target_pred, y_T_mean, n_steps, runner.alphas,
                                runner.one_minus_alphas_bar_sqrt, only_last_sample=True)
    label_t_0 = label_t_0.softmax(dim=-1)
    t2 = time.perf_counter()
    with warnings.catch_warnings():
      warnings.simplefilter("ignore")  # kappa of a 1-image batch is undefined (NaN), as official
      acc = U.accuracy(label_t_0.detach().cpu(), target.cpu())[0].item()
      # official: .item() on sklearn's numpy float64; newer sklearn returns a Python float
      kappa = float(U.cohen_kappa(label_t_0.detach().cpu(), target.cpu()))
  t3 = time.perf_counter()
  if phases is not None:
    phases.setdefault("two_dcg_calls", []).append(t1 - t0)
    phases.setdefault("p_sample_loop", []).append(t2 - t1)
    phases.setdefault("metrics", []).append(t3 - t2)
  return label_t_0, acc, kappa


# ---------------------------------------------------------------------------------------------
# Timing
# ---------------------------------------------------------------------------------------------

def time_row(fn, repeats, label):
  """One warm-up call, then `repeats` timed calls; peak RSS of the row (VmHWM after a reset)."""
  gc.collect()
  reset_ok = host.reset_peak_rss()
  start = time.perf_counter()
  fn(None)
  first = time.perf_counter() - start
  print(f"  {label}: warm-up call {first:.2f} s", flush=True)
  times, cpu_times, phases = [], [], {}
  for r in range(repeats):
    start, cpu_start = time.perf_counter(), time.process_time()
    fn(phases)
    times.append(time.perf_counter() - start)
    cpu_times.append(time.process_time() - cpu_start)
    print(f"  {label}: repeat {r + 1}/{repeats} {times[-1]:.2f} s (process CPU time "
          f"{cpu_times[-1]:.2f} s)", flush=True)
  peak = host.peak_rss_bytes()
  return {"times_s": times, "first_call_s": first, "cpu_times_s": cpu_times,
          "peak_memory_bytes": peak,
          "peak_memory_is_row_peak": reset_ok,
          "phases_median_s": {k: statistics.median(v) for k, v in phases.items()}}


def matmul_probe(torch, repeats):
  a = torch.randn(32, 6144)
  w = torch.randn(6144, 6144)
  for _ in range(3):
    torch.mm(a, w)
  ts = []
  for _ in range(repeats):
    s = time.perf_counter()
    torch.mm(a, w)
    ts.append(time.perf_counter() - s)
  ms = statistics.median(ts) * 1e3
  return {"shape": "[32,6144]x[6144,6144]", "ms": ms, "gflops": 2 * 32 * 6144 * 6144 / ms / 1e6,
          "best_ms": min(ts) * 1e3, "repeats": repeats}


def main():
  a = parse_args()
  if a.repeats < 1:
    raise SystemExit("--repeats must be >= 1")
  import torch
  torch.set_num_threads(a.threads)
  torch.manual_seed(a.seed)
  official_dir = os.path.abspath(a.official_dir)
  load_start = os.getloadavg()
  if a.extra_path and a.extra_path not in sys.path:
    sys.path.insert(0, os.path.abspath(a.extra_path))
  commit = a.official_commit or official_code.tree_commit(official_dir)

  off = official_code.import_official(official_dir)
  config, args, runner, model = official_code.build(off, official_dir, a.config)
  n_params = sum(p.numel() for p in model.parameters())
  n_dcg = sum(p.numel() for p in runner.cond_pred_model.parameters())
  C, size = config.data.num_classes, 224
  result = {
      "device": "cpu:torch",
      "framework": f"pytorch {torch.__version__}",
      "torchvision_version": off.torchvision.__version__,
      "official_repo": "scott-yjyang/DiffMIC",
      "official_commit": commit,
      "threads": a.threads,
      "torch_num_threads": torch.get_num_threads(),
      "cpu": host.cpu_description(),  # as benchmark.py: the CPU models compare equal
      "cpu_affinity": sorted(os.sched_getaffinity(0)),
      "torch_parallel_info": torch.__config__.parallel_info().strip().splitlines()[:8],
      "load_average": list(load_start),
      "config": {"config_file": a.config, "dataset": config.data.dataset, "num_classes": C,
                 "image_size": size, "feature_dim": config.model.feature_dim,
                 "encoder_arch": config.model.arch, "timesteps": config.diffusion.timesteps,
                 "config_test_timesteps": config.diffusion.test_timesteps,
                 "dtype": "float32", "noise_model_params": n_params, "dcg_params": n_dcg},
      "patches": official_code.PATCHES,
      "import_stubs": official_code.IMPORT_STUBS,
      "inputs": "random tensors: x ~ N(0,1) [B,3,224,224] (as normalised images), labels "
                "uniform in [0,C); untrained (random-init) weights",
      "repeats": a.repeats,
      "warmup_calls": 1,
      "matmul_probe": None,
      "inference": [],
      "training": [],
  }
  print(f"official DiffMIC @ {commit}; torch {torch.__version__} ({a.threads} threads); CPU "
        f"{result['cpu']['model']} {' '.join(result['cpu']['vector_extensions'])}; "
        f"noise model {n_params:,} params, DCG {n_dcg:,}; load {load_start}", flush=True)

  result["matmul_probe"] = matmul_probe(torch, a.matmul_repeats)
  print(f"matmul probe: {result['matmul_probe']['ms']:.2f} ms "
        f"({result['matmul_probe']['gflops']:.1f} GFLOP/s)", flush=True)

  gen = torch.Generator().manual_seed(a.seed)
  if a.only != "training":
    for steps in [int(s) for s in a.steps.split(",") if s]:
      for batch in [int(b) for b in a.batches.split(",") if b]:
        images = torch.randn(batch, 3, size, size, generator=gen)
        target = torch.randint(0, C, (batch,), generator=gen)
        label = f"inference official_truncated:{steps} batch {batch}"
        print(label, flush=True)
        timing = time_row(lambda ph: official_test_batch(off, runner, model, config, images,
                                                         target, steps, ph), a.repeats, label)
        med, best = statistics.median(timing["times_s"]), min(timing["times_s"])
        row = {"sampler": "official_truncated", "steps": steps, "batch": batch,
               "images_per_s": batch / med, "seconds_per_image": med / batch,
               "seconds_per_batch": med, "best_images_per_s": batch / best, **timing}
        result["inference"].append(row)
        print(f"  -> {row['images_per_s']:.4g} images/s, {med:.2f} s per batch, peak "
              f"{row['peak_memory_bytes'] / 1e9:.2f} GB", flush=True)
        del images, target

  if a.only != "inference":
    state = official_code.TrainState(off, runner, model, config)
    batch = a.train_batch
    x = torch.randn(batch, 3, size, size, generator=gen)
    y = torch.randint(0, C, (batch,), generator=gen)
    for stage in [s for s in a.stages.split(",") if s]:
      label = f"training {stage} batch {batch}"
      print(label, flush=True)
      if stage == "warmup":
        fn = lambda ph: official_code.official_warmup_step(  # noqa: E731
            off, runner, config, state, x, y)
      elif stage == "joint":
        fn = lambda ph: official_code.official_train_iteration(  # noqa: E731
            off, runner, model, config, args, state, x, y, ph)
      else:
        raise SystemExit(f"unknown stage {stage!r} (warmup, joint)")
      timing = time_row(fn, a.repeats, label)
      med, best = statistics.median(timing["times_s"]), min(timing["times_s"])
      row = {"stage": stage, "batch": batch, "images_per_s": batch / med,
             "seconds_per_step": med, "best_images_per_s": batch / best, **timing}
      if stage == "joint":
        row["what"] = ("full official training iteration: DCG eval forward, 3 noising streams, "
                       "backward (also into the DCG), clip + Adam + EMA, joint DCG CE + AMSGrad "
                       "step")
      else:
        row["what"] = "DCG warm-up step alone: train mode, CE on fused logits, AMSGrad"
      result["training"].append(row)
      print(f"  -> {row['images_per_s']:.4g} images/s, {med:.2f} s per step, peak "
            f"{row['peak_memory_bytes'] / 1e9:.2f} GB", flush=True)

  result["ru_maxrss_bytes"] = ru_maxrss_bytes()
  result["load_average_end"] = list(os.getloadavg())
  os.makedirs(os.path.dirname(os.path.abspath(a.json)), exist_ok=True)
  files.write_json(a.json, result, indent=1)
  print(f"wrote {a.json}; load average at start {result['load_average']}, end "
        f"{result['load_average_end']}; ru_maxrss {result['ru_maxrss_bytes'] / 1e9:.2f} GB",
        flush=True)


if __name__ == "__main__":
  main()
