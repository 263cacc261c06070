"""Where does the diffusion head help or hurt its guidance? (issue: accuracy diagnosis)

Restores a checkpoint of a training run and measures, on a split:
  * agreement of the diffusion head with the DCG (fused) prediction, and which images the head
    fixes (DCG wrong, diffusion right) or breaks (the reverse), per class;
  * whether ŷ₀ just follows the prior μ (argmax agreement, mean |ŷ₀ − μ|);
  * the DCG's accuracy on the *training* split in eval mode (an over-fitted DCG gives the
    denoiser one-hot priors in training and wrong ones at test time);
  * the ε-MSE per timestep band (what the denoiser learned where);
  * every sampler (official_truncated, full, respaced) × (raw, EMA) × ŷ₀ clip on/off, and
    S-sample mean/vote;
  * max |ŷ₀| and max |y_t| at every step of the chain (divergence tracking).

  python experiments/accuracy/diagnose.py --config configs/busi_cpu.py --workdir runs/busi_cpu \
      [--checkpoint best] [--json out.json] [--max_examples N] [--weights raw,ema]
      [--config.x=y ...]
Prints one JSON object (and writes it with --json).
"""

import functools
import json

import jax
import jax.numpy as jnp
import numpy as np
from absl import app
from absl import flags
from ml_collections import config_flags

from diffmic_jax.data import input_pipeline
from diffmic_jax.diffusion import diffusion
from diffmic_jax.diffusion import models as models_lib
from diffmic_jax.evaluation import evaluate
from diffmic_jax.nn import denoiser as denoiser_lib
from diffmic_jax.nn import fast_conv
from diffmic_jax.run import metrics

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config of the run.", lock_config=False)
_WORKDIR = flags.DEFINE_string("workdir", None, "Training workdir.")
_CHECKPOINT = flags.DEFINE_string("checkpoint", "best", "best | latest | step.")
_JSON = flags.DEFINE_string("json", "", "Write the results here too.")
_SAMPLES = flags.DEFINE_integer("num_samples", 10, "S for the multi-sample rows.")
_MAX_EXAMPLES = flags.DEFINE_integer(
    "max_examples", 0, "Use only the first N examples of each split (0 = all; in 64-image batches).")
_WEIGHTS = flags.DEFINE_list("weights", ["raw", "ema"], "Which weights to probe: raw, ema.")


def _chain_trajectory(denoise_fn, schedule, prior, cond, key, timesteps, clip):
  """Like sampler.run_chain, but returns every step's (max|y_t|, max|ŷ₀|) and the final ŷ₀."""
  ts = jnp.asarray(timesteps, jnp.int32)
  key_init, key_steps = jax.random.split(key)
  y = prior + jax.random.normal(key_init, prior.shape)

  def step(y, t_pair):
    t, t_prev = t_pair
    noise = jax.random.normal(jax.random.fold_in(key_steps, t), y.shape)
    eps = denoise_fn(y, cond, t)
    y_new, y0 = diffusion.posterior_step(schedule, y, prior, eps, t, t_prev, noise, clip=clip)
    return y_new, (jnp.max(jnp.abs(y)), jnp.max(jnp.abs(y0)))

  y, (max_y, max_y0) = jax.lax.scan(step, y, (ts[:-1], ts[1:]))
  y0 = diffusion.predict_y0(schedule, y, prior, denoise_fn(y, cond, ts[-1]), ts[-1])
  if clip:
    y0 = jnp.clip(y0, -clip, clip)
  return y0, max_y, max_y0


def _outputs(models, variables, images, key, timesteps, clip, num_samples, probe="none"):
  """ŷ₀ [B, S, C], μ [B, C], DCG logits, per-step max|y_t| and max|ŷ₀| (over batch and samples).

  probe: 'none'; 'shuffle_x' (ρ(x) of another image of the batch: does the head use x?);
  'uniform_cond' (the conditioning input ŷ replaced by 1/C: does it use the guidance beyond μ?).
  """
  logits, _ = models.guidance.apply(variables["guidance"], images, train=False)
  prior, cond = models_lib.stream_inputs(models, logits)["fused"]
  dvars = variables["denoiser"]
  feats = models.denoiser.apply(dvars, images, train=False, method=denoiser_lib.NoiseModel.encode)
  if probe == "shuffle_x":
    feats = jnp.roll(feats, 1, axis=0)
  elif probe == "uniform_cond":
    cond = jnp.full_like(cond, 1.0 / models.num_classes)
  denoise_fn = lambda y, c, t: models.denoiser.apply(dvars, feats, y, c, t, train=False,
                                                     method=denoiser_lib.NoiseModel.denoise)
  chain = functools.partial(_chain_trajectory, denoise_fn, models.schedule(), prior, cond,
                            timesteps=timesteps, clip=clip)
  y0, max_y, max_y0 = jax.vmap(chain)(jax.random.split(key, num_samples))
  return {"y0": jnp.moveaxis(y0, 0, 1), "prior": prior, "logits": logits,
          "max_y": jnp.max(max_y, 0), "max_y0": jnp.max(max_y0, 0)}


def _eps_mse_by_band(models, variables, images, labels, key, bn_train=False):
  """ε-MSE of the fused stream at 20 timesteps, BN in eval mode (or batch statistics).

  Returns ([20] timesteps, [20, B] squared errors averaged over classes)."""
  T = models.num_timesteps
  logits, _ = models.guidance.apply(variables["guidance"], images, train=False)
  prior, cond = models_lib.stream_inputs(models, logits)["fused"]
  dvars = variables["denoiser"]
  feats = models.denoiser.apply(dvars, images, train=False, method=denoiser_lib.NoiseModel.encode)
  y0 = jax.nn.one_hot(labels, models.num_classes)
  ts = jnp.linspace(0, T - 1, 20).astype(jnp.int32)

  def at_t(t):
    noise = jax.random.normal(jax.random.fold_in(key, t), y0.shape)
    tb = jnp.full(labels.shape, t)
    y_t = diffusion.q_sample(models.schedule(), y0, prior, tb, noise)
    if bn_train:  # batch statistics instead of the running averages
      eps, _ = models.denoiser.apply(dvars, feats, y_t, cond, tb, train=True,
                                     method=denoiser_lib.NoiseModel.denoise,
                                     mutable=["batch_stats"])
    else:
      eps = models.denoiser.apply(dvars, feats, y_t, cond, tb, train=False,
                                  method=denoiser_lib.NoiseModel.denoise)
    return jnp.mean(jnp.square(eps - noise), axis=-1)  # [B]

  return ts, jax.vmap(at_t)(ts)  # [20], [20, B]


def collect(models, variables, batches, key, timesteps, clip, num_samples, probe="none"):
  run = jax.jit(functools.partial(_outputs, models, timesteps=timesteps, clip=clip,
                                  num_samples=num_samples, probe=probe),
                compiler_options=fast_conv.compiler_options())
  out = {"y0": [], "prior": [], "fused": [], "labels": [], "max_y": [], "max_y0": []}
  for i, batch in enumerate(batches):
    o = run(variables, batch["image"], jax.random.fold_in(key, i))
    m = batch["mask"].astype(bool)
    out["y0"].append(np.asarray(o["y0"])[m])
    out["prior"].append(np.asarray(o["prior"])[m])
    out["fused"].append(np.asarray(o["logits"]["fused"])[m])
    out["labels"].append(batch["label"][m])
    out["max_y"].append(np.asarray(o["max_y"]))
    out["max_y0"].append(np.asarray(o["max_y0"]))
  res = {k: np.concatenate(v) for k, v in out.items() if k not in ("max_y", "max_y0")}
  res["max_y"] = np.max(np.stack(out["max_y"]), 0)
  res["max_y0"] = np.max(np.stack(out["max_y0"]), 0)
  return res


def _f1(pred, labels, c):
  return metrics.classification_metrics(np.eye(c)[pred], labels, c)["f1_macro"]


def summarise(res, c):
  labels = res["labels"]
  y0 = np.nan_to_num(res["y0"], nan=0.0, posinf=1e30, neginf=-1e30)
  first = y0[:, 0].argmax(-1)
  mean_pred = y0.mean(1).argmax(-1)
  votes = np.stack([(y0[:, s].argmax(-1)[:, None] == np.arange(c)) for s in range(y0.shape[1])])
  vote_pred = votes.sum(0).argmax(-1)
  dcg = res["fused"].argmax(-1)
  prior_pred = res["prior"].argmax(-1)
  fixes = (dcg != labels) & (first == labels)
  breaks = (dcg == labels) & (first != labels)
  return {
      "n": int(len(labels)),
      "acc_dcg": float(np.mean(dcg == labels)), "f1_dcg": _f1(dcg, labels, c),
      "acc_diff_1": float(np.mean(first == labels)), "f1_diff_1": _f1(first, labels, c),
      "acc_diff_meanS": float(np.mean(mean_pred == labels)), "f1_diff_meanS": _f1(mean_pred, labels, c),
      "acc_diff_voteS": float(np.mean(vote_pred == labels)), "f1_diff_voteS": _f1(vote_pred, labels, c),
      "agree_diff_dcg": float(np.mean(first == dcg)),
      "agree_diff_prior": float(np.mean(first == prior_pred)),
      "mean_abs_y0_minus_prior": float(np.mean(np.abs(y0[:, 0] - res["prior"]))),
      "fixes_per_class": [int(np.sum(fixes & (labels == k))) for k in range(c)],
      "breaks_per_class": [int(np.sum(breaks & (labels == k))) for k in range(c)],
      "max_abs_y0_final": float(np.max(np.abs(y0))),
      "max_abs_y_chain": float(np.max(res["max_y"])),
      "max_abs_y0_chain": float(np.max(res["max_y0"])),
      "max_abs_y0_per_step_tail": [float(v) for v in res["max_y0"][::max(1, len(res["max_y0"]) // 10)]],
  }


def main(argv):
  del argv
  config = _CONFIG.value
  workdir = _WORKDIR.value
  splits = input_pipeline.create_splits(config.data, None)
  c = config.data.num_classes
  report = {"checkpoint": _CHECKPOINT.value}
  key = jax.random.PRNGKey(0)
  for ema in [w == "ema" for w in _WEIGHTS.value]:
    config.optim.eval_with_ema = ema
    models, variables = evaluate.load_variables(config, workdir, _CHECKPOINT.value)
    tag = "ema" if ema else "raw"
    for split in ("train", "test"):
      batches = list(input_pipeline.eval_batches(getattr(splits, split), config.data,
                                                 batch_size=64))
      if _MAX_EXAMPLES.value:
        batches = batches[:-(-_MAX_EXAMPLES.value // 64)]
      if split == "train" and ema:
        continue
      if split == "test":
        for bn_train in (False, True):
          mse_all = []
          for i, b in enumerate(batches):
            ts, mse = jax.jit(functools.partial(_eps_mse_by_band, models, bn_train=bn_train),
                              compiler_options=fast_conv.compiler_options())(
                variables, b["image"], b["label"], jax.random.fold_in(key, i))
            mse_all.append(np.asarray(mse)[:, b["mask"].astype(bool)])
          name = f"{tag}_eps_mse_by_t" + ("_bn_batch_stats" if bn_train else "")
          report[name] = {int(t): float(v) for t, v in
                          zip(np.asarray(ts), np.concatenate(mse_all, 1).mean(1))}
          print(name, json.dumps({k: round(v, 3) for k, v in report[name].items()}), flush=True)
        if not ema:
          ts = diffusion.timestep_sequence("official_truncated", models.num_timesteps,
                                           config.diffusion.test_steps)
          for probe in ("shuffle_x", "uniform_cond"):
            row = summarise(collect(models, variables, batches, key, ts, 0.0, _SAMPLES.value,
                                    probe), c)
            report[f"{tag}/{split}/probe_{probe}"] = row
            print(f"{tag} {split} probe_{probe}: " + json.dumps(
                {k: v for k, v in row.items() if not k.startswith("max_abs_y0_per")}), flush=True)
      T = models.num_timesteps
      samplers = [("official_truncated", config.diffusion.test_steps), ("full", T),
                  ("respaced", 10)]
      if split == "train":
        samplers = samplers[:1]
      for name, n in samplers:
        for clip in ((0.0, 2.0) if split == "test" else (0.0,)):
          ts = diffusion.timestep_sequence(name, T, n)
          res = collect(models, variables, batches, key, ts, clip,
                        _SAMPLES.value if split == "test" else 1)
          row = summarise(res, c)
          report[f"{tag}/{split}/{name}{n}/clip{clip}"] = row
          print(f"{tag} {split} {name}{n} clip{clip}: " + json.dumps(
              {k: v for k, v in row.items() if not k.startswith("max_abs_y0_per")}), flush=True)
  if _JSON.value:
    with open(_JSON.value, "w") as f:
      json.dump(report, f, indent=1)


if __name__ == "__main__":
  flags.mark_flags_as_required(["config", "workdir"])
  app.run(main)
