"""Batch-1 latency: does a narrower weight format make the sampler's big products faster on CPU?

At batch 1 one sampler step multiplies a [1, F] vector by the denoiser's two F x F matrices
(F = 6144, 151 MB each in float32), so 100 steps read 30 GB of weights: at a VM's 25-70 GB/s
that is the batch-1 floor in float32. Storing the weights in bfloat16 or int8 halves or
quarters the bytes, but only pays if XLA's CPU code for the product keeps up with memory.

This times a 100-step `lax.scan` of two F x F products (softplus between them, as in the
denoiser) in each formulation, compiled as the package compiles on CPU, next to NumPy's float32
product and a plain float32 sum over the matrix (the memory bandwidth this VM gives now):

  python experiments/speed/matvec_formats.py [--features 6144] [--steps 100] [--json OUT]

Formulations: float32 dot (what the sampler runs); bfloat16 weights in a bfloat16 dot with
float32 accumulation; bfloat16 and int8 weights (per-output scale) converted to float32 inside
the product, as a dot and as a multiply-and-reduce over the input axis (the form XLA fuses into
one loop that reads the narrow weights once); int8 weights times dynamically quantised int8
activations, accumulated in int32.
"""

import argparse
import json
import sys
import time

# Must run before JAX creates its CPU thread pool, so before any array exists.
from diffmic_jax.nn import fast_conv
from diffmic_jax.platform import files
from diffmic_jax.platform import host

host.tune_cpu_malloc()

import jax  # pylint: disable=g-import-not-at-top,g-bad-import-order
import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
import numpy as np  # pylint: disable=g-import-not-at-top
from jax import lax  # pylint: disable=g-import-not-at-top


def _parse_args(argv):
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--features", type=int, default=6144, help="F (the paper's 6144)")
  p.add_argument("--steps", type=int, default=100, help="sampler steps per call")
  p.add_argument("--reps", type=int, default=3, help="best of N timed calls")
  p.add_argument("--json", default=None, help="write the rows here")
  return p.parse_args(argv)


def _scales(w):
  """Per-output-column int8 scales of w [F_in, F_out] -> [1, F_out]."""
  return jnp.max(jnp.abs(w), axis=0, keepdims=True) / 127


def formats(w):
  """{name: (product(x [1, F], weights) -> [1, F], weights)} for one matrix w [F_in, F_out]."""
  scale = _scales(w)
  q = jnp.round(w / scale).astype(jnp.int8)  # [F_in, F_out]

  def f32_dot(x, w32):
    return x @ w32

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
  return {"float32 dot": (f32_dot, w),
          "bfloat16 dot (float32 accumulation)": (bf16_dot, wb),
          "bfloat16 weights, float32 dot": (bf16_upcast_dot, wb),
          "bfloat16 weights, multiply-and-reduce": (bf16_reduce, wb.T),
          "int8 weights, float32 dot": (int8_upcast_dot, (q, scale)),
          "int8 weights, multiply-and-reduce": (int8_reduce, (q.T, scale)),
          "int8 x int8 dot (int32 accumulation)": (int8_int8_dot, (q, scale))}


def chain(product, weights, steps):
  """A jitted 100-step scan: x -> softplus(x W) -> softplus(. W), normalised, per step."""
  def step(x, _):
    h = jax.nn.softplus(product(x, weights))
    h = jax.nn.softplus(product(h, weights))
    return h / (1 + jnp.mean(jnp.abs(h))), None
  return jax.jit(lambda x: lax.scan(step, x, None, length=steps)[0],
                 compiler_options=fast_conv.compiler_options())


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
  rows = []
  sum_s = best_seconds(lambda: w_np.sum(), a.reps * 5)
  numpy_s = best_seconds(lambda: x_np @ w_np, a.reps * 5)
  print(f"{host.cpu_description()['model']}; F={f}: float32 matrix {mb:.0f} MB; NumPy sum "
        f"{sum_s * 1e3:.2f} ms ({w_np.nbytes / sum_s / 1e9:.1f} GB/s), NumPy product "
        f"{numpy_s * 1e3:.2f} ms ({w_np.nbytes / numpy_s / 1e9:.1f} GB/s)", flush=True)
  w, x = jnp.asarray(w_np), jnp.asarray(x_np)
  for name, (product, weights) in formats(w).items():
    fn = chain(product, weights, a.steps)
    jax.block_until_ready(fn(x))
    seconds = best_seconds(lambda fn=fn: jax.block_until_ready(fn(x)), a.reps)
    weight_mb = sum(leaf.nbytes for leaf in jax.tree.leaves(weights)) / 1e6
    per_product = seconds / (2 * a.steps)
    rows.append({"format": name, "weights_mb": weight_mb, "seconds_per_call": seconds,
                 "ms_per_product": per_product * 1e3,
                 "weight_gb_per_s": weight_mb / 1e3 / per_product})
    print(f"  {name:40s} {weight_mb:6.0f} MB  {seconds:.3f} s per {a.steps} steps  "
          f"{per_product * 1e3:.2f} ms per product  ({rows[-1]['weight_gb_per_s']:.1f} GB/s "
          f"of weights)", flush=True)
  if a.json:
    files.write_json(a.json, {
        "what": "batch-1 products of the sampler in several weight formats",
        "cpu": host.cpu_description(), "jax": jax.__version__, "features": f,
        "steps": a.steps, "reps": a.reps, "numpy_sum_ms": sum_s * 1e3,
        "numpy_product_ms": numpy_s * 1e3, "rows": rows}, indent=1)
    print(f"wrote {a.json}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
