"""Speed of DiffMIC-JAX: training stages and samplers, after compilation.

Measures, for freshly initialised variables and random inputs (weights do not change timing):
  * inference: images/s and seconds per image of `sampler.make_sample_fn` for each
    `--samplers` entry (name:steps), at each `--batch-size`;
  * training: images/s of the DCG warm-up step and of the joint step
    (`train.make_train_steps` compiled by `train.jit_step`, state donated);
  * compile time of every function (lower + XLA compile), reported apart from the steady state;
  * achieved FLOP/s (XLA cost analysis, `summary.flops_per_image` for the sampler's parts,
    every convolution counted as a direct one whichever `model.conv_impl` runs it) against
    this machine's measured float32 matmul peak, and the ratio to that FLOP floor;
  * input (`--only input`): images/s of the training input pipeline at 224 px (in-memory demo
    images, the config's augmentation) in-process and with each `--input-workers` count;
  * peak memory of each row: on CPU the process's resident high-water mark, reset before the
    row (Linux; elsewhere the process-wide peak), and XLA's own buffer estimate for the
    executable; on GPU/TPU the device's `peak_bytes_in_use`;
  * the CPU model and its vector extensions (AVX2 and AVX-512 machines differ a lot);
  * with `--compare-official PATH`, the speed-up and memory ratio of every row that the
    official code's JSON (same schema, measured on this machine) also has.
The same script runs on CPU and GPU unchanged. The default run measures inference at batch 32
and batch 1 (latency) and both training stages at batch 32.

Usage (the default config is the paper's HAM10000 setting: 224 px, ResNet-50 DCG trunks,
ResNet-18 ρ(x), F=6144, T=1000, C=7):

  # headline: paper configuration, inference, 100 truncated steps, batch 32
  python experiments/speed/benchmark.py --only inference --samplers official_truncated:100
  # every sampler the README reports, and both training stages
  python experiments/speed/benchmark.py --repeats 2 \
      --samplers official_truncated:60,official_truncated:100,official_truncated:250,respaced:10
  python experiments/speed/benchmark.py --only training --repeats 2
  # the small CPU configuration (the demo: 64 px, narrow 2-stage ResNet-18s, F=256, T=100)
  python experiments/speed/benchmark.py --config configs/demo.py \
      --samplers official_truncated:100,full:0
  # the training input pipeline at 224 px: in-process, then 1, 2 and 4 worker processes
  python experiments/speed/benchmark.py --only input
  # overrides and JSON output
  python experiments/speed/benchmark.py --config.model.dtype=bfloat16 --json /tmp/bench.json
  # speed-ups against the official code timed on this machine (a JSON in this schema)
  python experiments/speed/benchmark.py --compare-official official.json

`--samplers` entries are NAME:STEPS with NAME one of official_truncated | full | respaced
(STEPS is ignored by 'full', which always runs T steps). Rows are measured in the order
inference (by batch size) then training.
"""

import json
import os
import statistics
import sys
import time

from absl import app
from absl import flags
import ml_collections
from ml_collections import config_flags

# Lets `python experiments/speed/benchmark.py` import configs/ and diffmic_jax from the repo root.
_REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
if _REPO not in sys.path:
  sys.path.insert(0, _REPO)

# pylint: disable=g-import-not-at-top,wrong-import-position
import jax
import jax.numpy as jnp
import numpy as np

from diffmic_jax.data import demo
from diffmic_jax.data import input_pipeline
from diffmic_jax.diffusion import diffusion
from diffmic_jax.diffusion import models as models_lib
from diffmic_jax.diffusion import sampler
from diffmic_jax.nn import fast_conv
from diffmic_jax.platform import distributed
from diffmic_jax.platform import errors
from diffmic_jax.platform import files
from diffmic_jax.platform import host
from diffmic_jax.platform import sharding
from diffmic_jax.run import train_state
from diffmic_jax.training import summary
from diffmic_jax.training import train
# pylint: enable=g-import-not-at-top,wrong-import-position

_CONFIG = config_flags.DEFINE_config_file(
    "config", os.path.join(_REPO, "configs", "ham10000.py"),
    "Experiment config (default: the paper's HAM10000 configuration).", lock_config=True)
_BATCH = flags.DEFINE_list("batch-size", ["32", "1"], "Global batch size(s) for inference, comma "
                           "separated (batch 1 gives the latency per image).")
_TRAIN_BATCH = flags.DEFINE_list("train-batch-size", ["32"], "Global batch size(s) for training.")
_ONLY = flags.DEFINE_enum("only", None, ["inference", "training", "input"],
                          "Measure only this part (input: only with --only).")
_SAMPLERS = flags.DEFINE_list(
    "samplers", ["official_truncated:60", "official_truncated:100", "official_truncated:250",
                 "respaced:10"],
    "Samplers to time, NAME:STEPS (add full:0 for the whole T-step chain).")
_STAGES = flags.DEFINE_list("stages", ["warmup", "joint"], "Training stages to time.")
_REPEATS = flags.DEFINE_integer("repeats", 3, "Timed calls per measurement after the first.")
_JSON = flags.DEFINE_string("json", None, "Write the results as JSON to this path (after every "
                            "row with 'complete': false, so that a stopped run keeps its rows; "
                            "at the end with 'complete': true).")
_MATMUL_SIZE = flags.DEFINE_integer("matmul-size", 4096, "Side of the peak-matmul probe.")
_MATMUL_REPEATS = flags.DEFINE_integer("matmul-repeats", 6, "Best of N for the matmul probe.")
_TUNE_MALLOC = flags.DEFINE_bool("tune-malloc", True,
                                 "CPU: keep glibc from unmapping XLA's big buffers after every "
                                 "call (host.tune_cpu_malloc).")
_FLOPS = flags.DEFINE_bool("flops", True, "Count FLOPs with XLA's cost analysis.")
_COMPARE = flags.DEFINE_string(
    "compare-official", None, "JSON of the official code's timings in this script's schema, "
    "measured on this machine: adds speed-up and memory-ratio columns.")
_INPUT_WORKERS = flags.DEFINE_list("input-workers", ["0", "1", "2", "4"],
                                   "--only input: grain worker counts (0 = in-process).")
_INPUT_BATCHES = flags.DEFINE_integer("input-batches", 30,
                                      "--only input: timed batches per worker count.")
_INPUT_SIZE = 224  # the paper's input side
_INPUT_DISTINCT = 256  # distinct in-memory 224-px images (37 MB, copied to every worker)
_INPUT_EXAMPLES = 6306  # the source's length: HAM10000's training split (grain's index
                        # shuffle costs about 30 ms / length per example: small splits pay more)


def row_key(kind: str, row: dict) -> tuple:
  """What makes two rows comparable: ('inference', sampler, steps, batch) or
  ('training', stage, batch)."""
  if kind == "inference":
    return (kind, row["sampler"], int(row["steps"]), int(row["batch"]))
  return (kind, row["stage"], int(row["batch"]))


def read_json(path: str, what: str):
  """The JSON content of `path`.

  Raises:
    errors.UserError: naming `what` (the flag or file the user gave), if the file cannot be
      read or is not JSON.
  """
  try:
    with open(path) as f:
      return json.load(f)
  except OSError as e:
    raise errors.UserError(f"{what}: cannot read it ({e.strerror})") from e
  except ValueError as e:
    raise errors.UserError(f"{what}: not valid JSON ({e})") from e


def load_official(path: str) -> dict:
  """The official timings of `path` (this script's JSON schema) by `row_key`.

  Returns:
    {'cpu': the CPU it was measured on (or None), 'rows': {row_key: row}}.

  Raises:
    errors.UserError: the file is missing, not JSON, or has no rows in this schema.
  """
  what = f"--compare-official {path}"
  content = read_json(path, what)
  rows = rows_by_key(content, what)
  if not rows:
    raise errors.UserError(f"{what}: no 'inference' or 'training' rows")
  return {"cpu": content.get("cpu"), "rows": rows}


def rows_by_key(content, what: str) -> dict:
  """{row_key: row} of a JSON in this script's schema (ours or the official harness's).

  Raises:
    errors.UserError: naming `what` (the flag or file), if a row lacks its keys or has no
      images_per_s > 0.
  """
  rows = {}
  try:
    for kind in ("inference", "training"):
      for row in content.get(kind, []):
        if not row["images_per_s"] > 0:
          raise ValueError(f"images_per_s={row['images_per_s']!r}")
        rows[row_key(kind, row)] = row
  except (KeyError, TypeError, ValueError, AttributeError) as e:
    raise errors.UserError(
        f"{what}: expected this benchmark's JSON schema ('inference' rows "
        "with sampler, steps, batch, images_per_s > 0; 'training' rows with stage, batch, "
        f"images_per_s > 0); {type(e).__name__}: {e}") from e
  return rows


def add_comparison(result: dict, official: dict) -> None:
  """Adds 'official_images_per_s', 'speedup' and 'memory_ratio' (ours / official peak memory)
  to every row of `result` that `official` (from `load_official`) also measured."""
  for kind in ("inference", "training"):
    for row in result[kind]:
      theirs = official["rows"].get(row_key(kind, row))
      if theirs is None:
        continue
      row["official_images_per_s"] = theirs["images_per_s"]
      row["speedup"] = row["images_per_s"] / theirs["images_per_s"]
      if theirs.get("peak_memory_bytes") and row.get("peak_memory_bytes"):
        row["memory_ratio"] = row["peak_memory_bytes"] / theirs["peak_memory_bytes"]


def _is_paper_config(config) -> bool:
  return (config.data.image_size == 224 and config.model.feature_dim == 6144
          and config.guidance.backbone == "resnet50" and not tuple(config.guidance.stage_sizes)
          and not tuple(config.model.encoder_stage_sizes) and config.guidance.width == 64
          and config.model.encoder_width == 64 and config.diffusion.timesteps == 1000
          and config.ablation == "full" and config.model.dtype == "float32")


def _device_name() -> str:
  d = jax.devices()[0]
  kind = getattr(d, "device_kind", d.platform)
  return f"{jax.device_count()}x {d.platform}:{kind} ({jax.process_count()} process(es))"


def peak_memory_bytes() -> int:
  """Peak memory: device peak_bytes_in_use on accelerators; on CPU the resident high-water
  mark since `host.reset_peak_rss` (called before each row)."""
  device = jax.devices()[0]
  if device.platform != "cpu":
    stats = device.memory_stats() or {}
    if "peak_bytes_in_use" in stats:
      return int(stats["peak_bytes_in_use"])
  return host.peak_rss_bytes()


def _xla_memory_bytes(compiled) -> int | None:
  """XLA's estimate of one call's buffers (arguments + outputs + temporaries, minus aliasing)."""
  try:
    m = compiled.memory_analysis()
  except (NotImplementedError, AttributeError, RuntimeError):
    return None
  if m is None:
    return None
  return int(m.argument_size_in_bytes + m.output_size_in_bytes + m.temp_size_in_bytes
             - m.alias_size_in_bytes)


def matmul_peak_gflops(n: int, repeats: int) -> float:
  """Best-of-N float32 n×n matmul rate: the machine's practical FLOP ceiling."""
  a = jax.random.normal(jax.random.PRNGKey(0), (n, n), jnp.float32)
  b = jax.random.normal(jax.random.PRNGKey(1), (n, n), jnp.float32)
  f = jax.jit(jnp.matmul)
  jax.block_until_ready(f(a, b))
  best = float("inf")
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(f(a, b))
    best = min(best, time.perf_counter() - start)
  return 2 * n**3 / best / 1e9


def _time_calls(call, repeats: int) -> list[float]:
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    call()
    times.append(time.perf_counter() - start)
  return times


def _random_batch(key, batch: int, size: int, num_classes: int, mesh) -> dict:
  """A global batch of `batch` rows; each process gives its share (batch / processes)."""
  k_img, k_lab = jax.random.split(key)
  local = batch // jax.process_count()
  host = {"image": np.asarray(jax.random.normal(k_img, (local, size, size, 3), jnp.float32)),
          "label": np.asarray(jax.random.randint(k_lab, (local,), 0, num_classes), np.int32)}
  return sharding.put_batch(host, mesh)


def _parse_samplers(entries, num_timesteps):
  out = []
  for entry in entries:
    name, _, steps = entry.partition(":")
    steps = num_timesteps if name == "full" else int(steps or 0)
    diffusion.timestep_sequence(name, num_timesteps, steps)  # validates
    out.append((name, steps))
  return out


def sampler_flops_per_image(parts: dict, name: str, steps: int, num_timesteps: int) -> float:
  """Guidance + ρ(x) once, then one denoiser evaluation per visited timestep."""
  calls = len(diffusion.timestep_sequence(name, num_timesteps, steps))
  return parts["guidance_forward"] + parts.get("rho_x", 0.0) + calls * parts.get("denoiser_step",
                                                                                 0.0)


def benchmark_inference(models, variables, mesh, samplers, batches, repeats, flop_parts,
                        num_timesteps, image_size, on_row=None):
  """One row per (sampler, batch): compile time, then median/best of `repeats` calls;
  `on_row(row)` after each."""
  rows = []
  key = jax.random.PRNGKey(1)
  for batch in batches:
    images = _random_batch(jax.random.fold_in(key, batch), batch, image_size,
                           models.num_classes, mesh)["image"]
    for name, steps in samplers:
      host.reset_peak_rss()
      fn = sampler.make_sample_fn(models, name, steps,
                                  compiler_options=fast_conv.compiler_options())
      start = time.perf_counter()
      compiled = fn.lower(variables, images, key).compile()
      compile_s = time.perf_counter() - start
      host.release_free_memory()
      call = lambda: jax.block_until_ready(compiled(variables, images, key))  # pylint: disable=cell-var-from-loop
      first = _time_calls(call, 1)[0]
      times = _time_calls(call, repeats)
      median, best = statistics.median(times), min(times)
      row = {"sampler": name, "steps": steps, "batch": batch,
             "images_per_s": batch / median, "seconds_per_image": median / batch,
             "best_images_per_s": batch / best, "seconds_per_batch": median,
             "first_call_s": first, "compile_s": compile_s, "times_s": times,
             "peak_memory_bytes": peak_memory_bytes(), "xla_memory_bytes": _xla_memory_bytes(compiled)}
      if flop_parts:
        row["gflop_per_image"] = sampler_flops_per_image(flop_parts, name, steps,
                                                         num_timesteps) / 1e9
      rows.append(row)
      _print_progress("inference", row)
      if on_row:
        on_row(row)
      del compiled
  return rows


def benchmark_training(models, config, mesh, stages, batches, repeats, want_flops,
                       known_flops_per_image=None, on_row=None):
  """One row per (stage, batch): the jitted, donating step of `train.make_train_steps`;
  `on_row(row)` after each.

  `known_flops_per_image` maps (stage, batch) to FLOPs per image already counted (the joint
  iteration at training.batch_size of `summary.flops_per_image`), so that its step is not
  lowered a second time for the count (about 15 s in the paper configuration).
  """
  known_flops_per_image = known_flops_per_image or {}
  rows = []
  guidance_tx, denoiser_tx, schedule = train_state.build_optimizers(config, steps_per_epoch=100)
  steps = train.make_train_steps(models, config, guidance_tx, denoiser_tx, schedule,
                                 joint_start=0)
  for batch in batches:
    batch_arrays = _random_batch(jax.random.PRNGKey(batch), batch, config.data.image_size,
                                 models.num_classes, mesh)
    for stage in stages:
      row = _training_row(models, config, mesh, guidance_tx, denoiser_tx, steps[stage],
                          batch, batch_arrays, repeats)
      if want_flops:  # the model's FLOPs, convolutions as direct ones, whatever conv_impl runs
        flops = known_flops_per_image.get((stage, batch))
        if flops is None:
          flops = summary.training_flops_per_image(config, stage, batch)
        row["gflop_per_image"] = flops / 1e9
      rows.append({"stage": stage, "batch": batch, **row})
      _print_progress("training", rows[-1])
      if on_row:
        on_row(rows[-1])
  return rows


def _training_row(models, config, mesh, guidance_tx, denoiser_tx, step, batch, batch_arrays,
                  repeats):
  """Times one training step function. Its own function so that the row's train state and
  executable are freed when it returns: a closure kept from the row before held that row's
  whole train state (2.5 GB in the paper configuration) through the next row's peak."""
  host.reset_peak_rss()
  state = train_state.create_train_state(models, config, guidance_tx, denoiser_tx,
                                         jax.random.PRNGKey(config.seed), load_pretrained=False)
  state = sharding.replicate(state, mesh)
  start = time.perf_counter()
  lowered = train.jit_step(step, mesh).lower(state, batch_arrays)
  compiled = lowered.compile()
  compile_s = time.perf_counter() - start
  host.release_free_memory()  # as train.run_stage does before a stage's first step
  holder = [state]
  del state  # the holder's entry is replaced by each donated call's output

  def call():
    holder[0], metrics = compiled(holder[0], batch_arrays)
    jax.block_until_ready((holder[0], metrics))

  first = _time_calls(call, 1)[0]
  times = _time_calls(call, repeats)
  median, best = statistics.median(times), min(times)
  row = {"images_per_s": batch / median, "seconds_per_step": median,
         "best_images_per_s": batch / best, "first_call_s": first, "compile_s": compile_s,
         "times_s": times, "peak_memory_bytes": peak_memory_bytes(),
         "xla_memory_bytes": _xla_memory_bytes(compiled)}
  return row


def _print_progress(kind, row):
  what = (f"{row['sampler']}:{row['steps']}" if kind == "inference" else row["stage"])
  print(f"  [{kind}] {what} batch {row['batch']}: compile {row['compile_s']:.1f} s, "
        f"first call {row['first_call_s']:.2f} s, times {[round(t, 3) for t in row['times_s']]} "
        f"-> {row['images_per_s']:.3g} img/s", flush=True)


def _fmt(value, spec):
  return "" if value is None else format(value, spec)


def format_table(result: dict) -> str:
  """A Markdown table of every row (speed-up columns where `add_comparison` filled them)."""
  peak = result["matmul_peak_gflops"]
  head = ("| what | batch | compile s | s/batch (median) | images/s | s/image | GFLOP/image | "
          "achieved GFLOP/s | × FLOP floor | peak mem GB | official images/s | speedup | "
          "memory vs official |")
  lines = [head, "|" + "---|" * (head.count("|") - 1)]
  rows = [(r, f"{r['sampler']} {r['steps']} steps", r["seconds_per_batch"])
          for r in result["inference"]]
  rows += [(r, f"{r['stage']} step", r["seconds_per_step"]) for r in result["training"]]
  for r, what, seconds in rows:
    gflop = r.get("gflop_per_image")
    achieved = gflop * r["images_per_s"] if gflop else None
    floor = (1 / r["images_per_s"]) / (gflop / peak) if gflop else None
    speedup = r.get("speedup")
    lines.append(
        f"| {what} | {r['batch']} | {r['compile_s']:.1f} | {seconds:.3g} | "
        f"{r['images_per_s']:.3g} | {1 / r['images_per_s']:.3g} | "
        f"{_fmt(gflop, '.3g')} | {_fmt(achieved, '.3g')} | {_fmt(floor, '.2f')} | "
        f"{r['peak_memory_bytes'] / 1e9:.1f} | {_fmt(r.get('official_images_per_s'), '.3g')} | "
        f"{_fmt(speedup, '.2f') + '×' if speedup else ''} | "
        f"{_fmt(r.get('memory_ratio'), '.2f')} |")
  return "\n".join(lines)


def run(config, batches, train_batches, only, sampler_entries, stages, repeats,
        matmul_size=4096, matmul_repeats=6, want_flops=True, on_row=None) -> dict:
  """Measures everything asked for and returns the JSON-ready result dict.

  `on_row(result)`, if given, is called after every finished row with the result so far (its
  rows included), so that a run stopped midway (a time budget, a kill) keeps what it measured.
  """
  mesh = sharding.make_mesh()
  for b in set(batches) | set(train_batches):
    if b % mesh.size:
      raise ValueError(f"batch size {b} must be divisible by the {mesh.size} devices")
  models = models_lib.create_models(config)
  result = {"device": _device_name(), "cpu": host.cpu_description(), "config": {
      "image_size": config.data.image_size, "num_classes": models.num_classes,
      "guidance_backbone": config.guidance.backbone, "encoder": config.model.encoder,
      "feature_dim": config.model.feature_dim, "timesteps": models.num_timesteps,
      "dtype": config.model.dtype, "conv_impl": config.model.conv_impl,
      "sampler_weights": config.diffusion.sampler_weights},
            "jax_version": jax.__version__, "load_average": os.getloadavg(),
            "malloc": host.malloc_in_use(), "compiler_options": fast_conv.compiler_options()}
  print(f"device: {result['device']}; CPU: {result['cpu']['model']}, "
        f"{result['cpu']['cores']} logical cores, {' '.join(result['cpu']['vector_extensions'])}; "
        f"malloc: {result['malloc']}; compiler options: {result['compiler_options']}; "
        f"config: {result['config']}", flush=True)
  result["matmul_peak_gflops"] = matmul_peak_gflops(matmul_size, matmul_repeats)
  print(f"float32 matmul peak ({matmul_size}²): {result['matmul_peak_gflops']:.1f} GFLOP/s",
        flush=True)
  result["compile_s"], result["inference"], result["training"] = {}, [], []
  known_flops = {}  # (stage, batch) -> FLOPs per image counted for the inference rows

  def keep(kind):
    def add(row):
      result[kind].append(row)
      if on_row:
        on_row(result)
    return add

  if only != "training" and models.denoiser is not None:
    start = time.perf_counter()
    guidance_tx, denoiser_tx, _ = train_state.build_optimizers(config, steps_per_epoch=100)
    init = jax.jit(models_lib.init_variables, static_argnums=(0, 2))
    variables = init(models, jax.random.PRNGKey(config.seed), config.data.image_size)
    jax.block_until_ready(variables)
    result["compile_s"]["init_variables (compile + run)"] = time.perf_counter() - start
    del guidance_tx, denoiser_tx
    variables = sharding.replicate(variables, mesh)
    flop_parts = None
    if want_flops:
      start = time.perf_counter()
      flop_parts = summary.flops_per_image(config, variables)
      result["flops_analysis_s"] = time.perf_counter() - start
      result["flops_per_image"] = flop_parts
      if "training_joint_iteration" in flop_parts:
        known_flops[("joint", config.training.batch_size)] = (
            flop_parts["training_joint_iteration"])
    samplers = _parse_samplers(sampler_entries, models.num_timesteps)
    benchmark_inference(models, variables, mesh, samplers, batches, repeats, flop_parts,
                        models.num_timesteps, config.data.image_size, keep("inference"))
    del variables
  if only != "inference":
    benchmark_training(models, config, mesh, stages, train_batches, repeats, want_flops,
                       known_flops, keep("training"))
  for r in result["inference"]:
    result["compile_s"][f"sample {r['sampler']}:{r['steps']} batch {r['batch']}"] = r["compile_s"]
  for r in result["training"]:
    result["compile_s"][f"{r['stage']} step batch {r['batch']}"] = r["compile_s"]
  result["load_average_end"] = os.getloadavg()
  return result


class _CycledSource:
  """A source of `length` examples cycling over a few in-memory images (picklable, small)."""

  def __init__(self, images: np.ndarray, labels: np.ndarray, length: int):
    self.images, self.labels, self.length = images, labels, length

  def __len__(self) -> int:
    return self.length

  def __getitem__(self, index: int) -> dict:
    index %= len(self.images)
    return {"image": self.images[index], "label": int(self.labels[index])}


def benchmark_input(data_config, batch: int, workers: list[int], num_batches: int) -> list[dict]:
  """One row per worker count: images/s of `input_pipeline.train_iterator` at 224 px.

  The source is in memory (demo images, cycled), so the rows measure shuffling, the
  augmentation of data_config (flips, PIL rotation), normalisation and batching, not decoding
  or disk. After a
  warm-up (the workers start and the pipeline fills), `num_batches` batches are timed; a
  consumer that takes each batch at once keeps the buffers empty, so this is the steady rate.
  """
  images, labels = demo.make_demo(_INPUT_DISTINCT, _INPUT_SIZE, seed=0)
  source = _CycledSource(images, labels, _INPUT_EXAMPLES)
  rows = []
  for num_workers in workers:
    config = ml_collections.ConfigDict(data_config.to_dict())
    config.num_workers = num_workers
    iterator = input_pipeline.train_iterator(source, config, batch_size=batch, seed=0)
    start = time.perf_counter()
    for _ in range(2 * num_workers + 2):
      next(iterator)
    warmup_s = time.perf_counter() - start
    start = time.perf_counter()
    for _ in range(num_batches):
      next(iterator)
    rate = num_batches * batch / (time.perf_counter() - start)
    rows.append({"num_workers": num_workers, "batch": batch, "images_per_s": rate,
                 "images_per_s_per_worker": rate / max(num_workers, 1), "warmup_s": warmup_s,
                 "image_size": _INPUT_SIZE, "timed_batches": num_batches})
    print(f"  [input] {num_workers} worker(s), batch {batch}: warm-up {warmup_s:.1f} s -> "
          f"{rate:.0f} images/s", flush=True)
    del iterator  # stops its worker processes before the next row starts its own
  return rows


def format_input_table(rows: list[dict]) -> str:
  """A Markdown table of the input rows."""
  lines = ["| workers | batch | images/s | images/s per worker | warm-up s |", "|---|---|---|---|---|"]
  for r in rows:
    who = "0 (in-process)" if r["num_workers"] == 0 else str(r["num_workers"])
    lines.append(f"| {who} | {r['batch']} | {r['images_per_s']:.0f} | "
                 f"{r['images_per_s_per_worker']:.0f} | {r['warmup_s']:.1f} |")
  return "\n".join(lines)


def run_input(config, batch: int, workers: list[int], num_batches: int) -> dict:
  """`--only input`: the JSON-ready result of `benchmark_input` (no model is built)."""
  load_average = os.getloadavg()
  rows = benchmark_input(config.data, batch, workers, num_batches)
  return {"device": _device_name(), "cpu": host.cpu_description(), "cpu_count": os.cpu_count(),
          "cpu_affinity": len(os.sched_getaffinity(0)), "load_average": load_average,
          "input": rows, "load_average_end": os.getloadavg()}


def main(argv):
  del argv
  try:
    official = load_official(_COMPARE.value) if _COMPARE.value else None
  except errors.UserError as e:
    sys.exit(f"error: {e}")
  config = _CONFIG.value
  if _TUNE_MALLOC.value:  # before the first JAX computation; harmless off CPU.
    host.tune_cpu_malloc()
  # Under `python -m diffmic_jax.launch --module experiments.speed.benchmark`: the launcher's
  # coordinator, and gloo for collectives between CPU processes.
  distributed.initialize(config.training.distributed)
  batches = [int(b) for b in _BATCH.value]
  train_batches = [int(b) for b in (_TRAIN_BATCH.value or _BATCH.value)]
  if _ONLY.value == "input":
    result = run_input(config, train_batches[0], [int(w) for w in _INPUT_WORKERS.value],
                       _INPUT_BATCHES.value)
    print(f"\nCPU: {result['cpu']['model']}, {' '.join(result['cpu']['vector_extensions'])}; "
          f"{result['cpu_affinity']} of {result['cpu_count']} CPUs; load average at start "
          f"{result['load_average']}, at end {result['load_average_end']}\n")
    print(format_input_table(result["input"]), flush=True)
    _write_json(result)
    return
  result = run(config, batches, train_batches, _ONLY.value, _SAMPLERS.value, _STAGES.value,
               _REPEATS.value, _MATMUL_SIZE.value, _MATMUL_REPEATS.value, _FLOPS.value,
               on_row=lambda partial: _write_json({**partial, "complete": False}, quiet=True))
  result["complete"] = True
  paper = _is_paper_config(config)
  if official:
    add_comparison(result, official)
    result["official_cpu"] = official["cpu"]
    if official["cpu"] and official["cpu"].get("model") != result["cpu"]["model"]:
      print(f"WARNING: the official timings come from {official['cpu'].get('model')!r}, this is "
            f"{result['cpu']['model']!r}: speed-ups compare different machines")
  print(f"\nload average at start {result['load_average']}, at end {result['load_average_end']}")
  print(f"matmul peak {result['matmul_peak_gflops']:.1f} GFLOP/s; "
        f"{'paper configuration' if paper else 'not the paper configuration'}; "
        f"median of {_REPEATS.value} calls after compile + 1 call\n")
  print(format_table(result), flush=True)
  _write_json(result)


def _write_json(result: dict, quiet: bool = False) -> None:
  """--json: `result`, atomically (after each row with 'complete': False, at the end True)."""
  if _JSON.value and jax.process_index() == 0:  # every process measured the same steps
    files.write_json(_JSON.value, result, indent=2, default=float)
    if not quiet:
      print(f"\nwrote {_JSON.value}")


if __name__ == "__main__":
  app.run(main)
