"""2-D convolution whose backward pass is fast on CPU.

XLA's CPU backend computes the convolution kernel gradient (d_kernel) of 1x1
convolutions at 2-30 GFLOP/s on the 2-core Zen 3 dev machine, against ~150
GFLOP/s for a plain matmul; its 3x3 d_kernel runs at 25-180 GFLOP/s depending
on the layer. `conv2d` keeps XLA's convolution for the forward pass and for the
input gradient (a 1x1 conv already lowers to the same dot as an explicit
matmul, bit-identical and equally fast), but with impl='im2col' computes
d_kernel with an explicit im2col and a matmul in the layout XLA's CPU matmul
handles best:

  d_kernel[i, j] = cols(i, j)[C, N] @ dy[N, O],   N = B * H_out * W_out,

where cols(i, j) is the input window of tap (i, j), transposed to
channel-major. The taps of one kernel row (or several rows, within a memory
budget) are concatenated so each matmul has K*C rows instead of C, which keeps
the matmul near peak while never materialising the whole patch matrix of a
big layer (the 7x7 stem at 224 px, batch 32, would need 236 MB).

impl='auto' uses that backward on CPU only where it measured faster (1x1
kernels, see `_cpu_im2col_wins`) and XLA's convolution everywhere else and on
every other backend, where cuDNN's kernel gradient is already fast.

A second, independent CPU cost (glibc's allocator) is handled by
`host.tune_cpu_malloc`.
"""

import functools

import jax
from jax import lax
import jax.numpy as jnp

_DIMENSION_NUMBERS = ("NHWC", "HWIO", "NHWC")

# Budget for one im2col chunk in bytes. A chunk is a whole number of kernel
# rows, so a 3x3 layer at 56x56x64, batch 32, takes three 77 MB chunks and the
# 7x7 stem seven 34 MB ones instead of one 236 MB patch matrix.
_CHUNK_BYTES = 64 * 1024 * 1024

_IMPLS = ("auto", "xla", "im2col")


def _xla_conv(x, kernel, strides, padding):
  """XLA convolution with NHWC / HWIO / NHWC layout."""
  return lax.conv_general_dilated(
      x, kernel, window_strides=strides, padding=padding,
      dimension_numbers=_DIMENSION_NUMBERS)


def _kernel_grad(x, dy, kernel_shape, strides, padding):
  """d_kernel of an NHWC/HWIO convolution as im2col matmuls.

  Args:
    x: input, [B, H, W, Ci].
    dy: output cotangent, [B, Ho, Wo, Co].
    kernel_shape: (kh, kw, Ci, Co).
    strides: (sh, sw).
    padding: ((top, bottom), (left, right)), non-negative ints.

  Returns:
    float32 [kh, kw, Ci, Co].
  """
  kh, kw, ci, co = kernel_shape
  sh, sw = strides
  b, ho, wo, _ = dy.shape
  n = b * ho * wo
  # Taps only read rows [0, (Ho - 1) * sh + kh) of the padded input; pad (or
  # crop) to exactly that, rounded up to a multiple of the stride.
  hp = -(-((ho - 1) * sh + kh) // sh) * sh
  wp = -(-((wo - 1) * sw + kw) // sw) * sw
  h, w = x.shape[1], x.shape[2]
  # Transpose to channel-major [Ci, B, H, W] first, so that a tap window
  # reshapes to [Ci, N] and the matmul is the plain [M, K] @ [K, N] that
  # XLA's CPU dot runs at peak (the A^T @ B form measured at half speed).
  # The pad (negative = crop) comes after the transpose on purpose: it pins
  # the transposed layout, so XLA materialises the transpose once with its
  # tiled transpose emitter. Transposing after the pad let layout assignment
  # turn the transpose into a bitcast and every tap then gathered channels at
  # a 4*Ci-byte stride (3.7x slower on the 56x56x64 layer).
  xt = jnp.transpose(x, (3, 0, 1, 2))
  xt = lax.pad(xt, jnp.zeros((), x.dtype),
               ((0, 0, 0), (0, 0, 0),
                (padding[0][0], hp - h - padding[0][0], 0),
                (padding[1][0], wp - w - padding[1][0], 0)))
  if sh > 1 or sw > 1:
    # Split into stride phases, [sh, sw, Ci, B, Hp/sh, Wp/sw]: tap (i, j)
    # is then a unit-stride window of phase (i % sh, j % sw) at offset
    # (i // sh, j // sw); strided gathers in the minor dimension were the
    # slow part of the stride-2 layers.
    xt = xt.reshape(ci, b, hp // sh, sh, wp // sw, sw)
    xt = jnp.transpose(xt, (3, 5, 0, 1, 2, 4))
  else:
    xt = xt[None, None]
  # Without the barrier XLA fuses the transpose into every tap's slice, i.e.
  # redoes the transpose kh * kw times.
  xt = lax.optimization_barrier(xt)
  dy2 = dy.reshape(n, co)

  def tap(i, j):
    i0, j0 = i // sh, j // sw
    win = xt[i % sh, j % sw, :, :, i0:i0 + ho, j0:j0 + wo]
    return win.reshape(ci, n)

  row_bytes = kw * ci * n * x.dtype.itemsize
  rows_per_chunk = max(1, min(kh, _CHUNK_BYTES // max(row_bytes, 1)))
  chunks = []
  for r0 in range(0, kh, rows_per_chunk):
    rows = range(r0, min(kh, r0 + rows_per_chunk))
    taps = [tap(i, j) for i in rows for j in range(kw)]
    cols = taps[0] if len(taps) == 1 else jnp.concatenate(taps, axis=0)
    # The barrier keeps the concatenation a plain buffer instead of a fusion
    # that the dot would re-evaluate element by element.
    cols = lax.optimization_barrier(cols)
    chunks.append(
        jnp.matmul(cols, dy2, preferred_element_type=jnp.float32))
  dk = chunks[0] if len(chunks) == 1 else jnp.concatenate(chunks, axis=0)
  return dk.reshape(kh, kw, ci, co)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _im2col_conv(x, kernel, strides, padding):
  return _xla_conv(x, kernel, strides, padding)


def _im2col_conv_fwd(x, kernel, strides, padding):
  return _xla_conv(x, kernel, strides, padding), (x, kernel)


def _im2col_conv_bwd(strides, padding, residuals, dy):
  x, kernel = residuals
  # d_input: XLA's transposed convolution is already as fast as the forward
  # pass; the forward value computed inside this vjp is dead and removed.
  _, x_vjp = jax.vjp(lambda x_: _xla_conv(x_, kernel, strides, padding), x)
  (dx,) = x_vjp(dy)
  dk = _kernel_grad(x, dy, kernel.shape, strides, padding)
  return dx, dk.astype(kernel.dtype)


_im2col_conv.defvjp(_im2col_conv_fwd, _im2col_conv_bwd)


def _cpu_im2col_wins(kernel_shape, strides):
  """Whether the matmul d_kernel beat XLA's for this layer on the dev CPU.

  Measured with experiments/conv_benchmark.py (ResNet-18/50 at 224 px, batch
  32, 2-core Zen 3 VM): XLA's d_kernel runs every 1x1 convolution at 2-30
  GFLOP/s and the matmul path is 2.5-10x faster there. For 3x3 and 7x7
  kernels the im2col copies cost about what they save: the 56x56x64 stride-1
  layer was 1.3x faster on a quiet machine but 0.8x with other processes on
  the cores (XLA's kernel there is single-threaded, so it suffers less from
  contention), and the stride-2 and >= 128-channel 3x3 layers, where XLA
  reaches 60-180 GFLOP/s, were 0.6-1.0x. So only 1x1 kernels switch.

  Args:
    kernel_shape: (kh, kw, Ci, Co).
    strides: (sh, sw); unused today, kept so the rule can depend on it.

  Returns:
    True to use the im2col backward.
  """
  del strides
  kh, kw, _, _ = kernel_shape
  return kh == 1 and kw == 1


def resolve_impl(impl="auto", kernel_shape=None, strides=(1, 1)):
  """Maps 'auto' to the implementation used on the current default backend.

  Args:
    impl: 'auto', 'xla' or 'im2col'.
    kernel_shape: optional (kh, kw, Ci, Co); with it, 'auto' on CPU picks
      per layer shape, without it it names the CPU default ('im2col').
    strides: (sh, sw), used with kernel_shape.

  Returns:
    'xla' or 'im2col'.
  """
  if impl not in _IMPLS:
    raise ValueError(f"impl must be one of {_IMPLS}, got {impl!r}")
  if impl != "auto":
    return impl
  if jax.default_backend() != "cpu":
    return "xla"
  if kernel_shape is None or _cpu_im2col_wins(kernel_shape, strides):
    return "im2col"
  return "xla"


def conv2d(x, kernel, strides=(1, 1), padding=((0, 0), (0, 0)), impl="auto"):
  """2-D convolution, NHWC input and HWIO kernel, explicit padding.

  Equal to lax.conv_general_dilated(x, kernel, strides, padding,
  dimension_numbers=('NHWC', 'HWIO', 'NHWC')), forward and gradients. Works
  under jit, grad and vmap, for float32 and bfloat16.

  Args:
    x: [B, H, W, Ci].
    kernel: [kh, kw, Ci, Co]; may have a different dtype from x only as XLA's
      conv allows (i.e. cast it first; both must match).
    strides: (sh, sw).
    padding: ((top, bottom), (left, right)), non-negative ints.
    impl: 'xla' (plain lax conv), 'im2col' (XLA forward and d_input, matmul
      d_kernel accumulated in float32), or 'auto' (on CPU 'im2col' for the
      layer shapes where it measured faster, see `_cpu_im2col_wins`, and
      'xla' for the rest; 'xla' on every other backend).

  Returns:
    [B, H', W', Co] with H' = (H + top + bottom - kh) // sh + 1, same for W'.
  """
  strides = tuple(int(s) for s in strides)
  padding = tuple((int(lo), int(hi)) for lo, hi in padding)
  if any(p < 0 for pair in padding for p in pair):
    raise ValueError(f"padding must be non-negative, got {padding}")
  if resolve_impl(impl, kernel.shape, strides) == "xla":
    return _xla_conv(x, kernel, strides, padding)
  return _im2col_conv(x, kernel, strides, padding)


def conv_flops(x_shape, kernel_shape, strides, padding):
  """Multiply-add FLOPs (2 per MAC) of one forward convolution.

  Args:
    x_shape: (B, H, W, Ci).
    kernel_shape: (kh, kw, Ci, Co).
    strides: (sh, sw).
    padding: ((top, bottom), (left, right)).

  Returns:
    FLOPs as an int; d_input and d_kernel cost the same.
  """
  b, h, w, _ = x_shape
  kh, kw, ci, co = kernel_shape
  ho = (h + sum(padding[0]) - kh) // strides[0] + 1
  wo = (w + sum(padding[1]) - kw) // strides[1] + 1
  return 2 * b * ho * wo * kh * kw * ci * co

