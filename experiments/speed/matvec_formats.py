"""Batch-1 latency: does a narrower weight format make the sampler's big products faster on CPU?

At batch 1 one sampler step multiplies a [1, F] vector by the denoiser's two F x F matrices
(F = 6144, 151 MB each in float32), so 100 steps read 30 GB of weights: at a VM's 25-70 GB/s
that is the batch-1 floor in float32. Storing the weights in bfloat16 or int8 halves or
quarters the bytes, but only pays if XLA's CPU code for the product keeps up with memory.

This times a 100-step `lax.scan` of two F x F products (softplus between them, as in the
denoiser) in each formulation, compiled as the package compiles on CPU, next to NumPy's float32
product and a plain float32 sum over the matrix (the memory bandwidth this VM gives now):

  python experiments/speed/matvec_formats.py [--features 6144] [--steps 100] [--rounds 3]
      [--backends ynnpack,eigen] [--json OUT]

Formulations: float32 dot (what the sampler runs, weights [in, out]); the same with the
weights stored [out, in] (x·Wᵀ, PyTorch's layout); bfloat16 weights in a bfloat16 dot with
float32 accumulation, also stored [out, in] and split in two halves (two independent dots that
XLA's runtime may run on both cores); bfloat16 and int8 weights (per-output scale) converted to
float32 inside the product, as a dot and as a multiply-and-reduce over the input axis (the
form XLA fuses into one loop that reads the narrow weights once); int8 weights times
dynamically quantised int8 activations, accumulated in int32; and the bfloat16 weights through
`bf16_matvec` (an XLA FFI handler on CPU, compiled on first use), the sampler's product under
diffusion.sampler_weights='bfloat16'.

Each formulation is compiled for each of XLA's two CPU dot libraries (`--backends`): YNNPACK,
which the package's CPU compiler options keep for dots (`fast_conv.compiler_options`), and
XLA's own Eigen kernels (no library fusions). A VM's memory bandwidth drifts within minutes,
so every variant is timed once per round, the rounds interleaved, and the median reported.
"""

import argparse
import json
import sys
import time

# Must run before JAX creates its CPU thread pool, so before any array exists.
from diffmic_jax.nn import bf16_matvec
from diffmic_jax.nn import fast_conv
from diffmic_jax.platform import files
from diffmic_jax.platform import host

host.tune_cpu_malloc()

import jax  # pylint: disable=g-import-not-at-top,g-bad-import-order
import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
import numpy as np  # pylint: disable=g-import-not-at-top
from jax import lax  # pylint: disable=g-import-not-at-top


# XLA's CPU dot libraries: the package's options (YNNPACK for dots and reductions), or none
# (XLA's own Eigen kernels). Off CPU both are the backend's default.
_NO_LIBRARY_FUSIONS = {"xla_cpu_experimental_ynn_fusion_type": ""}


def backend_options(name):
  """`jax.jit` compiler options of a `--backends` entry."""
  if name == "ynnpack":
    return fast_conv.compiler_options()
  if name == "eigen":
    return _NO_LIBRARY_FUSIONS if fast_conv.compiler_options() is not None else None
  raise ValueError(f"--backends: expected ynnpack or eigen, got {name!r}")


def _parse_args(argv):
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--features", type=int, default=6144, help="F (the paper's 6144)")
  p.add_argument("--steps", type=int, default=100, help="sampler steps per call")
  p.add_argument("--rounds", type=int, default=3,
                 help="timed calls per variant, one per interleaved round; the median is kept")
  p.add_argument("--backends", default="ynnpack,eigen",
                 help="comma-separated XLA CPU dot libraries: ynnpack, eigen")
  p.add_argument("--json", default=None, help="write the rows here")
  a = p.parse_args(argv)
  a.backends = a.backends.split(",")
  for name in a.backends:
    if name not in ("ynnpack", "eigen"):
      p.error(f"--backends: expected ynnpack or eigen, got {name!r}")
  if a.rounds < 1:
    p.error("--rounds: expected a positive integer")
  return a


def _scales(w):
  """Per-output-column int8 scales of w [F_in, F_out] -> [1, F_out]."""
  return jnp.max(jnp.abs(w), axis=0, keepdims=True) / 127


def formats(w):
  """{name: (product(x [1, F], weights) -> [1, F], weights)} for one matrix w [F_in, F_out]."""
  scale = _scales(w)
  q = jnp.round(w / scale).astype(jnp.int8)  # [F_in, F_out]

  def f32_dot(x, w32):
    return x @ w32

  def f32_dot_t(x, w32_t):  # w32_t [F_out, F_in]
    return lax.dot_general(x, w32_t, (((1,), (1,)), ((), ())))

  def bf16_dot_t_halves(x, halves):  # two [F_out / 2, F_in]
    xb = x.astype(jnp.bfloat16)
    return jnp.concatenate([lax.dot_general(xb, half, (((1,), (1,)), ((), ())),
                                            preferred_element_type=jnp.float32)
                            for half in halves], axis=1)

  def bf16_dot(x, wb):
    return lax.dot(x.astype(jnp.bfloat16), wb, preferred_element_type=jnp.float32)

  def bf16_upcast_dot(x, wb):
    return x @ wb.astype(jnp.float32)

  def bf16_reduce(x, wb_t):  # wb_t [F_out, F_in]
    return jnp.sum(wb_t.astype(jnp.float32) * x, axis=1)[None]

  def int8_upcast_dot(x, qs):
    qw, s = qs
    return (x @ qw.astype(jnp.float32)) * s

  def int8_reduce(x, qs):  # q_t [F_out, F_in]
    q_t, s = qs
    return jnp.sum(q_t.astype(jnp.float32) * x, axis=1)[None] * s

  def int8_int8_dot(x, qs):
    qw, s = qs
    a = jnp.max(jnp.abs(x)) / 127
    xq = jnp.round(x / a).astype(jnp.int8)
    return lax.dot(xq, qw, preferred_element_type=jnp.int32).astype(jnp.float32) * (a * s)

  wb = w.astype(jnp.bfloat16)
  half = w.shape[1] // 2
  return {"float32 dot": (f32_dot, w),
          "float32 dot, weights [out, in]": (f32_dot_t, w.T),
          "bfloat16 dot (float32 accumulation)": (bf16_dot, wb),
          "bfloat16 dot, weights [out, in] in two halves": (
              bf16_dot_t_halves, (wb.T[:half], wb.T[half:])),
          "bfloat16 weights, float32 dot": (bf16_upcast_dot, wb),
          "bfloat16 weights, multiply-and-reduce": (bf16_reduce, wb.T),
          "int8 weights, float32 dot": (int8_upcast_dot, (q, scale)),
          "int8 weights, multiply-and-reduce": (int8_reduce, (q.T, scale)),
          "int8 x int8 dot (int32 accumulation)": (int8_int8_dot, (q, scale)),
          # The sampler's product under diffusion.sampler_weights='bfloat16' (XLA FFI on CPU).
          "bfloat16 weights, bf16_matvec handler": (bf16_matvec.matvec, wb)}


def chain(product, steps, compiler_options):
  """A jitted 100-step scan: x -> softplus(x W) -> softplus(. W), normalised, per step; the
  weights are an argument (as the sampler's), not constants folded into the program."""
  def run(x, weights):
    def step(h, _):
      h = jax.nn.softplus(product(h, weights))
      h = jax.nn.softplus(product(h, weights))
      return h / (1 + jnp.mean(jnp.abs(h))), None
    return lax.scan(step, x, None, length=steps)[0]
  return jax.jit(run, compiler_options=compiler_options)


def best_seconds(fn, reps):
  times = []
  for _ in range(reps):
    start = time.perf_counter()
    fn()
    times.append(time.perf_counter() - start)
  return min(times)


def main(argv=None):
  a = _parse_args(argv)
  f = a.features
  rng = np.random.default_rng(0)
  w_np = (rng.standard_normal((f, f), np.float32) / np.sqrt(f)).astype(np.float32)
  x_np = rng.standard_normal((1, f), np.float32)
  mb = w_np.nbytes / 1e6
  sum_s = best_seconds(lambda: w_np.sum(), a.rounds * 5)
  numpy_s = best_seconds(lambda: x_np @ w_np, a.rounds * 5)
  print(f"{host.cpu_description()['model']}; F={f}: float32 matrix {mb:.0f} MB; NumPy sum "
        f"{sum_s * 1e3:.2f} ms ({w_np.nbytes / sum_s / 1e9:.1f} GB/s), NumPy product "
        f"{numpy_s * 1e3:.2f} ms ({w_np.nbytes / numpy_s / 1e9:.1f} GB/s)", flush=True)
  w, x = jnp.asarray(w_np), jnp.asarray(x_np)
  variants = []  # (backend, format name, compiled call, weights)
  for backend in a.backends:
    options = backend_options(backend)
    for name, (product, weights) in formats(w).items():
      fn = chain(product, a.steps, options)
      jax.block_until_ready(fn(x, weights))  # compile
      variants.append((backend, name, fn, weights))
  times = [[] for _ in variants]
  for _ in range(a.rounds):  # interleaved: a bandwidth drift hits every variant alike
    for i, (_, _, fn, weights) in enumerate(variants):
      times[i].append(best_seconds(lambda fn=fn, w=weights: jax.block_until_ready(fn(x, w)), 1))
  rows = []
  for (backend, name, _, weights), seconds in zip(variants, times):
    median = float(np.median(seconds))
    weight_mb = sum(leaf.nbytes for leaf in jax.tree.leaves(weights)) / 1e6
    per_product = median / (2 * a.steps)
    rows.append({"backend": backend, "format": name, "weights_mb": weight_mb,
                 "seconds_per_call": median, "seconds_per_call_rounds": seconds,
                 "ms_per_product": per_product * 1e3,
                 "weight_gb_per_s": weight_mb / 1e3 / per_product})
    print(f"  {backend:8s} {name:47s} {weight_mb:6.0f} MB  {median:.3f} s per {a.steps} steps  "
          f"(rounds {min(seconds):.3f}-{max(seconds):.3f})  {per_product * 1e3:.2f} ms per "
          f"product  ({rows[-1]['weight_gb_per_s']:.1f} GB/s of weights)", flush=True)
  if a.json:
    files.write_json(a.json, {
        "what": "batch-1 products of the sampler in several weight formats, layouts and XLA "
                "CPU dot libraries; median of interleaved rounds",
        "cpu": host.cpu_description(), "jax": jax.__version__, "features": f,
        "steps": a.steps, "rounds": a.rounds, "numpy_sum_ms": sum_s * 1e3,
        "numpy_product_ms": numpy_s * 1e3, "rows": rows}, indent=1)
    print(f"wrote {a.json}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
