"""The speed targets, evaluated from `benchmark.py`'s JSON for the machine at hand.

  python experiments/speed/speed_goals.py RESULT.json [MORE.json ...]

Each file is the JSON of a `benchmark.py --compare-official OFFICIAL.json --json RESULT.json`
run in the paper configuration, with the official code timed on the same machine (so every
ratio is computed, never typed). The default benchmark run has every row the goals need; rows
from later files (say a `--only training --stages joint` run, the joint step alone in its
process) are used where the earlier files lack them. Prints one markdown table: goal, what was
measured, the target and whether it is met.

The goals depend on the CPU kind the JSON names (`cpu.vendor`, `cpu.vector_extensions`): an
AVX-512 machine must reach ≥ 15× on inference and ≥ 1.5× on the joint step, an AMD one
without AVX-512 (the Zen 3 machine of the first measurements) ≥ 25× and ≥ 2×; an AMD CPU with
AVX-512 is both, so both targets are shown. On every kind: the DCG warm-up step ≥ 1.2×, the
100-step inference within 1.5× of its FLOP floor (direct-convolution FLOPs at the machine's
4096² matmul speed), one sampler step at batch 32 within 1.3× of its two F × F products at that
speed, batch-1 latency ≤ 0.75 s, and the joint step's peak memory at most the official code's.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

import benchmark  # pylint: disable=wrong-import-position
from diffmic_jax.diffusion import diffusion  # pylint: disable=wrong-import-position
from diffmic_jax.platform import errors  # pylint: disable=wrong-import-position

LONG_CHAIN = ("official_truncated", 100)  # the targets' inference: 100 truncated steps
SHORT_CHAIN = ("respaced", 10)  # the same DCG and ρ(x) with 90 fewer denoiser calls
BATCH = 32
WARMUP_TARGET = 1.2  # the DCG warm-up step's speed-up on every CPU kind


def load(paths: list[str]) -> tuple[dict, dict]:
  """Reads benchmark JSONs.

  Returns:
    (meta, rows): meta = {'cpu', 'matmul_peak_gflops', 'config', 'paths'} of the first file;
    rows = {('inference', sampler, steps, batch) or ('training', stage, batch): (row, path)},
    each row from the first file that has it.

  Raises:
    errors.UserError: a file is missing, not JSON, not this schema, has no official comparison,
      or was measured on another CPU model or configuration than the first.
  """
  meta, rows = None, {}
  for path in paths:
    content = benchmark.read_json(path, path)
    try:
      mine = {"cpu": content["cpu"], "matmul_peak_gflops": float(content["matmul_peak_gflops"]),
              "config": content["config"]}
      found = {benchmark.row_key(kind, row): row
               for kind in ("inference", "training") for row in content.get(kind, [])}
    except (KeyError, TypeError, ValueError, AttributeError) as e:
      raise errors.UserError(
          f"{path}: expected benchmark.py's JSON ('cpu', 'matmul_peak_gflops', 'config', "
          f"'inference' and 'training' rows); {type(e).__name__}: {e}") from e
    if not any("speedup" in row for row in found.values()):
      raise errors.UserError(f"{path}: no row has a 'speedup'; run benchmark.py with "
                             "--compare-official OFFICIAL.json (the official code timed on this "
                             "machine)")
    if meta is None:
      meta = {**mine, "paths": list(paths)}
    elif (mine["cpu"].get("model"), mine["config"]) != (meta["cpu"].get("model"), meta["config"]):
      raise errors.UserError(
          f"{path}: measured on {mine['cpu'].get('model')!r} with config {mine['config']}, but "
          f"{paths[0]} on {meta['cpu'].get('model')!r} with {meta['config']}; give runs of one "
          "machine and one configuration")
    for key, row in found.items():
      rows.setdefault(key, (row, path))
  return meta, rows


def targets(cpu: dict) -> dict:
  """{'inference': [(x, kind)], 'joint': [(x, kind)]}: the speed-up targets for this CPU kind."""
  avx512 = "avx512f" in cpu.get("vector_extensions", [])
  amd = cpu.get("vendor") == "AuthenticAMD"
  inference, joint = [], []
  if avx512 or not amd:  # a CPU of neither kind named is held to the AVX-512 targets
    inference.append((15.0, "AVX-512"))
    joint.append((1.5, "AVX-512"))
  if amd:
    inference.append((25.0, "AMD"))
    joint.append((2.0, "AMD"))
  return {"inference": inference, "joint": joint}


def row_targets(cpu: dict) -> dict:
  """{benchmark.row_key: [(x, kind)]}: the rows with a speed-up goal on this CPU kind and
  their targets (official s / ours s >= x)."""
  kinds = targets(cpu)
  return {("inference", *LONG_CHAIN, BATCH): kinds["inference"],
          ("training", "joint", BATCH): kinds["joint"],
          ("training", "warmup", BATCH): [(WARMUP_TARGET, "every kind")]}


def _calls(sampler: str, steps: int, num_timesteps: int) -> int:
  return len(diffusion.timestep_sequence(sampler, num_timesteps, steps))


def sampler_step(meta: dict, long_row: dict, short_row: dict, batch: int) -> tuple[float, float]:
  """(seconds per denoiser call at `batch`, seconds of its two F × F products at the peak).

  The two chains share the DCG and ρ(x), so their difference divided by the difference in
  denoiser calls is one call; a call's two [B, F] × [F, F] products take 2 · 2·B·F² FLOPs.
  """
  t = int(meta["config"]["timesteps"])
  calls = (_calls(long_row["sampler"], long_row["steps"], t)
           - _calls(short_row["sampler"], short_row["steps"], t))
  per_call = (long_row["seconds_per_batch"] - short_row["seconds_per_batch"]) / calls
  f = int(meta["config"]["feature_dim"])
  return per_call, 2 * 2 * batch * f * f / (meta["matmul_peak_gflops"] * 1e9)


def evaluate(meta: dict, rows: dict) -> list[dict]:
  """One entry per goal: {'goal', 'measured' (text), 'value' (the number compared), 'target'
  (text), 'met' (True, False or None when not measured), 'source' (the files of the rows
  used)}."""
  out = []

  def add(goal, target, value, met, sources, text):
    names = dict.fromkeys(os.path.basename(p) for p in
                          (sources if isinstance(sources, tuple) else (sources,)) if p)
    out.append({"goal": goal, "target": target, "value": value, "met": met,
                "source": ", ".join(names) or None, "measured": text})

  def row(*key):
    return rows.get(key, (None, None))

  inference, src = row("inference", *LONG_CHAIN, BATCH)
  for x, kind in targets(meta["cpu"])["inference"]:
    speedup = inference and inference.get("speedup")
    add(f"inference, {LONG_CHAIN[1]} steps, batch {BATCH} ({kind})", f">= {x:g}x official", speedup,
        None if speedup is None else speedup >= x, src,
        "not measured" if speedup is None else
        f"{speedup:.2f}x ({inference['images_per_s']:.3g} against "
        f"{inference['official_images_per_s']:.3g} images/s)")
  gflop = inference and inference.get("gflop_per_image")
  if gflop:
    floor = gflop / meta["matmul_peak_gflops"]
    ratio = inference["seconds_per_image"] / floor
    add("inference within 1.5x of its FLOP floor", "<= 1.5x", ratio, ratio <= 1.5, src,
        f"{ratio:.2f}x ({inference['seconds_per_image']:.4f} s/image; {gflop:.1f} GFLOP at "
        f"{meta['matmul_peak_gflops']:.0f} GFLOP/s = {floor:.4f} s)")
  else:
    add("inference within 1.5x of its FLOP floor", "<= 1.5x", None, None, src, "not measured")
  short, short_src = row("inference", *SHORT_CHAIN, BATCH)
  if inference and short:
    per_call, products = sampler_step(meta, inference, short, BATCH)
    ratio = per_call / products
    add(f"sampler step at batch {BATCH} within 1.3x of two F x F matmuls at peak", "<= 1.3x",
        ratio, ratio <= 1.3, (src, short_src),
        f"{ratio:.2f}x ({per_call * 1e3:.1f} against {products * 1e3:.1f} ms)")
  else:
    add(f"sampler step at batch {BATCH} within 1.3x of two F x F matmuls at peak", "<= 1.3x",
        None, None, None, f"not measured (needs the {SHORT_CHAIN[0]}:{SHORT_CHAIN[1]} row)")
  joint, joint_src = row("training", "joint", BATCH)
  for x, kind in targets(meta["cpu"])["joint"]:
    speedup = joint and joint.get("speedup")
    add(f"joint training step, batch {BATCH} ({kind})", f">= {x:g}x official", speedup,
        None if speedup is None else speedup >= x, joint_src,
        "not measured" if speedup is None else
        f"{speedup:.2f}x ({joint['seconds_per_step']:.2f} s per step)")
  warmup, warmup_src = row("training", "warmup", BATCH)
  speedup = warmup and warmup.get("speedup")
  add(f"DCG warm-up step, batch {BATCH}", f">= {WARMUP_TARGET:g}x official", speedup,
      None if speedup is None else speedup >= WARMUP_TARGET, warmup_src,
      "not measured" if speedup is None else
      f"{speedup:.2f}x ({warmup['seconds_per_step']:.2f} s per step)")
  latency, latency_src = row("inference", *LONG_CHAIN, 1)
  seconds = latency and latency.get("seconds_per_image")
  add(f"batch-1 latency, {LONG_CHAIN[1]} steps", "<= 0.75 s", seconds,
      None if seconds is None else seconds <= 0.75, latency_src,
      "not measured" if seconds is None else f"{seconds:.3f} s")
  ratio = joint and joint.get("memory_ratio")
  add("joint-step peak memory at most the official", "<= 1.0x", ratio,
      None if ratio is None else ratio <= 1.0, joint_src,
      "not measured" if ratio is None else
      f"{joint['peak_memory_bytes'] / 1e9:.1f} GB, {ratio:.2f}x the official")
  return out


def format_table(meta: dict, goals: list[dict]) -> str:
  extensions = " ".join(meta["cpu"].get("vector_extensions", []))
  lines = [f"CPU: {meta['cpu'].get('model')} ({extensions}); "
           f"matmul peak {meta['matmul_peak_gflops']:.0f} GFLOP/s; from {', '.join(meta['paths'])}",
           "", "| goal | measured | target | met? | from |", "|---|---|---|---|---|"]
  for g in goals:
    met = {True: "yes", False: "**no**", None: "-"}[g["met"]]
    lines.append(f"| {g['goal']} | {g['measured']} | {g['target']} | {met} | "
                 f"{g['source'] or '-'} |")
  return "\n".join(lines)


def main(argv: list[str]) -> int:
  if not argv or any(a.startswith("-") for a in argv):
    print("usage: python experiments/speed/speed_goals.py RESULT.json [MORE.json ...]",
          file=sys.stderr)
    return 2
  try:
    meta, rows = load(argv)
  except errors.UserError as e:
    print(f"error: {e}", file=sys.stderr)
    return 1
  print(format_table(meta, evaluate(meta, rows)))
  return 0


if __name__ == "__main__":
  sys.exit(main(sys.argv[1:]))
