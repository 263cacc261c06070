"""Times diffmic_jax.nn.fast_conv.conv2d against XLA's convolution on CPU.

For every distinct convolution of torchvision's ResNet-18 and ResNet-50 at
224x224 it times forward, d_input, d_kernel and a full forward+backward with
impl='xla' and impl='im2col', then a whole ResNet-18 SGD-momentum training
step with each impl.

Usage:
  python experiments/speed/conv_benchmark.py                      # batch 32, 224 px
  python experiments/speed/conv_benchmark.py --batch 8 --reps 3
  python experiments/speed/conv_benchmark.py --layers none        # train step only
  python experiments/speed/conv_benchmark.py --malloc-tune        # host.tune_cpu_malloc
  python experiments/speed/conv_benchmark.py --ynnpack-conv       # XLA's convolutions on YNNPACK

Every function is compiled as the package compiles its steps, with
`fast_conv.compiler_options()` (XLA's convolutions by Eigen's kernels on CPU), unless
--ynnpack-conv asks for jax's default.
  # the DCG's local ResNet-50 on 6 crops of 32 px per image, every impl
  python experiments/speed/conv_benchmark.py --layers local --impls xla,im2col,patches,auto
"""

import argparse
import sys
import time

# Must run before JAX creates its CPU thread pool, so before any array exists.
from diffmic_jax.nn import fast_conv
from diffmic_jax.platform import host

_ARGS = None


def _parse_args(argv):
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--batch", type=int, default=32)
  p.add_argument("--size", type=int, default=224, help="input side, pixels")
  p.add_argument("--reps", type=int, default=5, help="best of N timed calls")
  p.add_argument("--layers", choices=("r18", "r50", "local", "all", "none"),
                 default="all", help="'local': the DCG local ResNet-50 on its "
                 "--local-crops crops of 32 px per image (batch x crops examples)")
  p.add_argument("--local-crops", type=int, default=6)
  p.add_argument("--train-steps", type=int, default=3,
                 help="timed ResNet-18 train steps per impl (0 to skip)")
  p.add_argument("--dtype", choices=("float32", "bfloat16"),
                 default="float32")
  p.add_argument("--impls", default="xla,im2col",
                 help="comma-separated fast_conv impls: xla, im2col, patches, winograd, auto")
  p.add_argument("--malloc-tune", action="store_true",
                 help="call host.tune_cpu_malloc() first (one arena, "
                 "no mmap/trim of big blocks)")
  p.add_argument("--ynnpack-conv", action="store_true",
                 help="compile without fast_conv.compiler_options(): XLA's convolutions "
                 "on YNNPACK, jax 0.10's CPU default")
  return p.parse_args(argv)


if __name__ == "__main__":
  _ARGS = _parse_args(sys.argv[1:])
  if _ARGS.malloc_tune:
    host.tune_cpu_malloc()

# pylint: disable=g-import-not-at-top,wrong-import-position
import jax
import jax.numpy as jnp
import numpy as np

jax.config.update("jax_compilation_cache_dir", "/tmp/jax_cache")


def _layer_specs(size):
  """(name, H_in, Ci, Co, k, stride, pad, nets) for each distinct conv."""
  s4, s8, s16, s32 = size // 4, size // 8, size // 16, size // 32
  specs = [
      ("stem 7x7/2", size, 3, 64, 7, 2, 3, "r18 r50"),
      # ResNet-18 basic blocks.
      ("r18 l1 3x3", s4, 64, 64, 3, 1, 1, "r18 r50"),
      ("r18 l2 3x3/2", s4, 64, 128, 3, 2, 1, "r18"),
      ("r18 l2 3x3", s8, 128, 128, 3, 1, 1, "r18 r50"),
      ("r18 l2 ds 1x1/2", s4, 64, 128, 1, 2, 0, "r18"),
      ("r18 l3 3x3/2", s8, 128, 256, 3, 2, 1, "r18"),
      ("r18 l3 3x3", s16, 256, 256, 3, 1, 1, "r18 r50"),
      ("r18 l3 ds 1x1/2", s8, 128, 256, 1, 2, 0, "r18"),
      ("r18 l4 3x3/2", s16, 256, 512, 3, 2, 1, "r18"),
      ("r18 l4 3x3", s32, 512, 512, 3, 1, 1, "r18 r50"),
      ("r18 l4 ds 1x1/2", s16, 256, 512, 1, 2, 0, "r18"),
      # ResNet-50 bottlenecks (torchvision v1.5: stride on the 3x3).
      ("r50 l1 1x1 64-64", s4, 64, 64, 1, 1, 0, "r50"),
      ("r50 l1 1x1 64-256", s4, 64, 256, 1, 1, 0, "r50"),
      ("r50 l1 1x1 256-64", s4, 256, 64, 1, 1, 0, "r50"),
      ("r50 l2 1x1 256-128", s4, 256, 128, 1, 1, 0, "r50"),
      ("r50 l2 3x3/2", s4, 128, 128, 3, 2, 1, "r50"),
      ("r50 l2 1x1 128-512", s8, 128, 512, 1, 1, 0, "r50"),
      ("r50 l2 ds 1x1/2", s4, 256, 512, 1, 2, 0, "r50"),
      ("r50 l2 1x1 512-128", s8, 512, 128, 1, 1, 0, "r50"),
      ("r50 l3 1x1 512-256", s8, 512, 256, 1, 1, 0, "r50"),
      ("r50 l3 3x3/2", s8, 256, 256, 3, 2, 1, "r50"),
      ("r50 l3 1x1 256-1024", s16, 256, 1024, 1, 1, 0, "r50"),
      ("r50 l3 ds 1x1/2", s8, 512, 1024, 1, 2, 0, "r50"),
      ("r50 l3 1x1 1024-256", s16, 1024, 256, 1, 1, 0, "r50"),
      ("r50 l4 1x1 1024-512", s16, 1024, 512, 1, 1, 0, "r50"),
      ("r50 l4 3x3/2", s16, 512, 512, 3, 2, 1, "r50"),
      ("r50 l4 1x1 512-2048", s32, 512, 2048, 1, 1, 0, "r50"),
      ("r50 l4 ds 1x1/2", s16, 1024, 2048, 1, 2, 0, "r50"),
      ("r50 l4 1x1 2048-512", s32, 2048, 512, 1, 1, 0, "r50"),
  ]
  return specs


def _jit(fn, args):
  """jax.jit with the package's compiler options, or jax's defaults under --ynnpack-conv."""
  return jax.jit(fn, compiler_options=None if args.ynnpack_conv else fast_conv.compiler_options())


def _best_ms(fn, *args, reps):
  """Best-of-reps wall time of a jitted fn in ms, after one warm-up call."""
  jax.block_until_ready(fn(*args))
  best = float("inf")
  for _ in range(reps):
    t0 = time.perf_counter()
    jax.block_until_ready(fn(*args))
    best = min(best, time.perf_counter() - t0)
  return best * 1e3


def bench_layers(args, impls, dtype):
  """Prints per-layer ms and GFLOP/s for forward, d_input, d_kernel, full."""
  key = jax.random.PRNGKey(0)
  nets = {"all": ("r18", "r50"), "r18": ("r18",), "r50": ("r50",),
          "local": ("r50",)}[args.layers]
  size, batch = args.size, args.batch
  if args.layers == "local":  # the DCG's local net: K crops of 32 px per image
    size, batch = 32, args.batch * args.local_crops
  hdr = (f"{'layer':22s} {'HxW':>7s} {'GFLOP':>6s} | "
         + " | ".join(f"{'fwd':>5s} {'dx':>5s} {'dk':>6s} {'full':>6s} ({im})"
                      for im in impls)
         + " | dk GF/s " + "/".join(impls) + " | full speedup")
  print(hdr)
  print("-" * len(hdr))
  total = {im: 0.0 for im in impls}
  for name, h, ci, co, k, s, p, which in _layer_specs(size):
    if not any(n in which.split() for n in nets):
      continue
    kx, kw, ky = jax.random.split(jax.random.fold_in(key, h * ci + co), 3)
    x = jax.random.normal(kx, (batch, h, h, ci), dtype)
    w = (jax.random.normal(kw, (k, k, ci, co), jnp.float32)
         / np.sqrt(k * k * ci)).astype(dtype)
    strides, padding = (s, s), ((p, p), (p, p))
    flops = fast_conv.conv_flops(x.shape, w.shape, strides, padding)
    gflop = flops / 1e9
    ho = (h + 2 * p - k) // s + 1
    dy = jax.random.normal(ky, (batch, ho, ho, co), dtype)
    times = {}
    for im in impls:
      conv = lambda x_, w_, im=im: fast_conv.conv2d(x_, w_, strides, padding,
                                                     impl=im)
      fwd = _jit(conv, args)
      dx = _jit(lambda w_, dy_, conv=conv: jax.vjp(
          lambda x_: conv(x_, w_), x)[1](dy_)[0], args)
      dk = _jit(lambda x_, dy_, conv=conv: jax.vjp(
          lambda w_: conv(x_, w_), w)[1](dy_)[0], args)
      # Full step of one layer: forward, then both gradients of a loss.
      full = _jit(jax.grad(
          lambda x_, w_, conv=conv: jnp.sum(
              conv(x_, w_).astype(jnp.float32) * dy.astype(jnp.float32)),
          argnums=(0, 1)), args)
      times[im] = (_best_ms(fwd, x, w, reps=args.reps),
                   _best_ms(dx, w, dy, reps=args.reps),
                   _best_ms(dk, x, dy, reps=args.reps),
                   _best_ms(full, x, w, reps=args.reps))
      total[im] += times[im][3]
    cells = " | ".join(
        f"{t[0]:5.0f} {t[1]:5.0f} {t[2]:6.0f} {t[3]:6.0f}" + " " * (len(im) + 3)
        for im, t in times.items())
    gfs = "/".join(f"{gflop / t[2] * 1e3:.0f}" for t in times.values())
    speed = (times[impls[0]][3] / times[impls[-1]][3]) if len(impls) > 1 else 1
    print(f"{name:22s} {h:3d}->{ho:<3d} {gflop:6.2f} | {cells} | "
          f"{gfs:>9s} | {speed:5.2f}x", flush=True)
  print("sum of full fwd+bwd ms over distinct layers: "
        + ", ".join(f"{im} {t:.0f}" for im, t in total.items()))


# --- Minimal ResNet-18 (pure JAX, torchvision layout, NHWC) -----------------


def _init_resnet18(key, num_classes=1000):
  """He-initialised parameters of a torchvision-shaped ResNet-18."""
  keys = iter(jax.random.split(key, 64))

  def conv_p(k, ci, co):
    std = np.sqrt(2.0 / (k * k * co))
    return jax.random.normal(next(keys), (k, k, ci, co)) * std

  def bn_p(c):
    return {"scale": jnp.ones((c,)), "bias": jnp.zeros((c,))}

  params = {"stem": conv_p(7, 3, 64), "stem_bn": bn_p(64), "blocks": []}
  ci = 64
  for co, stride in ((64, 1), (128, 2), (256, 2), (512, 2)):
    for b in range(2):
      s = stride if b == 0 else 1
      blk = {"conv1": conv_p(3, ci, co), "bn1": bn_p(co),
             "conv2": conv_p(3, co, co), "bn2": bn_p(co)}
      if s != 1 or ci != co:
        blk["ds"] = conv_p(1, ci, co)
        blk["ds_bn"] = bn_p(co)
      params["blocks"].append(blk)
      ci = co
  params["fc_w"] = jax.random.normal(next(keys), (512, num_classes)) * 0.01
  params["fc_b"] = jnp.zeros((num_classes,))
  return params


def _block_strides():
  return [1, 1, 2, 1, 2, 1, 2, 1]


def _resnet18_apply(params, x, impl, compute_dtype):
  """Training-mode forward (batch-statistics BatchNorm); returns logits."""

  def conv(h, w, stride, pad):
    return fast_conv.conv2d(h, w.astype(compute_dtype), (stride, stride),
                            ((pad, pad), (pad, pad)), impl=impl)

  def bn(h, p):
    hf = h.astype(jnp.float32)
    mean = hf.mean(axis=(0, 1, 2))
    var = hf.var(axis=(0, 1, 2))
    hf = (hf - mean) * jax.lax.rsqrt(var + 1e-5) * p["scale"] + p["bias"]
    return hf.astype(compute_dtype)

  h = x.astype(compute_dtype)
  h = jax.nn.relu(bn(conv(h, params["stem"], 2, 3), params["stem_bn"]))
  h = jax.lax.reduce_window(h, -jnp.inf, jax.lax.max, (1, 3, 3, 1),
                            (1, 2, 2, 1), ((0, 0), (1, 1), (1, 1), (0, 0)))
  for blk, s in zip(params["blocks"], _block_strides()):
    y = jax.nn.relu(bn(conv(h, blk["conv1"], s, 1), blk["bn1"]))
    y = bn(conv(y, blk["conv2"], 1, 1), blk["bn2"])
    if "ds" in blk:
      h = bn(conv(h, blk["ds"], s, 0), blk["ds_bn"])
    h = jax.nn.relu(y + h)
  h = h.astype(jnp.float32).mean(axis=(1, 2))
  return h @ params["fc_w"] + params["fc_b"]


def bench_train_step(args, impls, dtype):
  """Prints ResNet-18 SGD-momentum train-step time and img/s per impl."""
  key = jax.random.PRNGKey(0)
  params = _init_resnet18(key)
  mom = jax.tree.map(jnp.zeros_like, params)
  x = jax.random.normal(key, (args.batch, args.size, args.size, 3))
  y = jax.random.randint(key, (args.batch,), 0, 1000)
  for im in impls:

    def loss_fn(p, im=im):
      logits = _resnet18_apply(p, x, im, dtype)
      logp = jax.nn.log_softmax(logits)
      return -jnp.take_along_axis(logp, y[:, None], axis=1).mean()

    def step_fn(p, m, loss_fn=loss_fn):
      loss, g = jax.value_and_grad(loss_fn)(p)
      m = jax.tree.map(lambda m_, g_: 0.9 * m_ + g_, m, g)
      p = jax.tree.map(lambda p_, m_: p_ - 0.01 * m_, p, m)
      return p, m, loss

    step = _jit(step_fn, args)

    t0 = time.perf_counter()
    out = jax.block_until_ready(step(params, mom))
    first = time.perf_counter() - t0
    best = float("inf")
    for _ in range(args.train_steps):
      t0 = time.perf_counter()
      out = jax.block_until_ready(step(params, mom))
      best = min(best, time.perf_counter() - t0)
    print(f"ResNet-18 train step {im:7s} {args.size}px batch {args.batch} "
          f"{dtype.__name__ if hasattr(dtype, '__name__') else dtype}: "
          f"first call {first:5.1f} s, best {best * 1e3:7.0f} ms = "
          f"{args.batch / best:5.2f} img/s (loss {float(out[2]):.3f})",
          flush=True)


def main(args):
  impls = tuple(args.impls.split(","))
  dtype = jnp.dtype(args.dtype).type
  print(f"jax {jax.__version__}, backend {jax.default_backend()}, "
        f"batch {args.batch}, {args.size}px, {args.dtype}, best of "
        f"{args.reps}, malloc tuned: {args.malloc_tune}, compiler options: "
        f"{None if args.ynnpack_conv else fast_conv.compiler_options()}")
  print("times in ms; dk GF/s = 2*MACs / d_kernel time; full = fwd + dx + dk")
  if args.layers != "none":
    bench_layers(args, impls, dtype)
  if args.train_steps > 0:
    bench_train_step(args, impls, dtype)


if __name__ == "__main__":
  main(_ARGS)
