"""2-D convolution (and max pooling, at the end) that is fast on CPU, forward and backward.

XLA's CPU backend computes the convolution kernel gradient (d_kernel) of 1x1
convolutions at 2-30 GFLOP/s on the 2-core Zen 3 dev machine, against ~150
GFLOP/s for a plain matmul; its 3x3 d_kernel runs at 25-180 GFLOP/s depending
on the layer. With impl='im2col', `conv2d` keeps XLA's convolution for the
forward pass and the input gradient of k x k kernels, but computes d_kernel
with an explicit im2col and a matmul in the layout XLA's CPU matmul handles
best:

  d_kernel[i, j] = cols(i, j)[C, N] @ dy[N, O],   N = B * H_out * W_out,

where cols(i, j) is the input window of tap (i, j), transposed to
channel-major. The taps of one kernel row (or several rows, within a memory
budget) are concatenated so each matmul has K*C rows instead of C, which keeps
the matmul near peak while never materialising the whole patch matrix of a
big layer (the 7x7 stem at 224 px, batch 32, would need 236 MB).

An unpadded 1x1 kernel is a matmul over channels, and 'im2col' computes all
three products as dots: the forward pass x[:, ::s, ::s] @ W, the input gradient
dy @ Wᵀ (placed back at the strided pixels) and d_kernel = x[N, Ci]ᵀ @ dy[N, Co]
without a transpose. In JAX 0.10 XLA's CPU convolution ran these layers at about
half the speed of the same dot on the Zen 4 dev CPU (`_pointwise_conv`).

impl='patches' computes the whole convolution as one matmul of its patch matrix
(gradients by autodiff), which is fast where the output has a few pixels and
XLA's CPU convolution is at its slowest.

impl='winograd' computes stride-1 3x3 convolutions by Winograd's minimal
filtering algorithm, F(2x2, 3x3) or F(4x4, 3x3) (`_winograd_conv`): cheap
additions around 16 or 36 large batched matmuls [B·tiles, Ci] @ [Ci, Co], 2.25x
or 4x fewer multiplications, the same transforms serving d_input and d_kernel.

impl='auto' uses these on CPU only where they measured faster ('patches' for
k x k layers with at most 4 output pixels, see `_cpu_patches_win`; 'winograd'
for stride-1 3x3 layers with at least 14 x 14 output pixels, see
`_cpu_winograd_wins`; 'im2col' for 1x1 kernels, see `_cpu_im2col_wins`) and
XLA's convolution everywhere else (on CPU with its d_kernel reading a matmul copy
of the input for 16-128 input channels, so that XLA cannot recompute the input's
producer inside its relayout: `_cpu_copies_kernel_grad_input`) and on every other
backend, where cuDNN's kernels are already fast. The numbers
are in experiments/speed/README.md ("Speed on an AVX-512 CPU", "CPU convolutions").

XLA's own CPU convolution comes in two kinds: by default (jax 0.10) XLA hands it to
YNNPACK, which was 1.2-4x slower than its other convolution (Eigen's) on the Zen 5 dev VM.
`compiler_options()` gives the `jax.jit` options that keep convolutions off YNNPACK; the
training steps, evaluation's sampler and the explanations compile with them.

A second, independent CPU cost (glibc's allocator) is handled by
`host.tune_cpu_malloc`.
"""

import functools
import os

import jax
from jax import lax
import jax.numpy as jnp

from diffmic_jax.platform import host

_DIMENSION_NUMBERS = ("NHWC", "HWIO", "NHWC")

_IMPLS = ("auto", "xla", "im2col", "patches", "winograd")

# 'auto' on CPU computes a k x k (k > 1) convolution with at most this many output pixels
# per image as one patch matmul (`_patches_conv`); see `_cpu_patches_win`.
_PATCHES_MAX_OUTPUT_PIXELS = 4


# XLA's CPU library fusions: jax 0.10's default list (dots, reductions, convolutions) without
# convolutions. See `compiler_options`.
_YNN_FUSION_OPTION = "xla_cpu_experimental_ynn_fusion_type"
_YNN_FUSION_TYPES_WITHOUT_CONVOLUTION = (
    "LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT,LIBRARY_FUSION_TYPE_REDUCE")


def compiler_options() -> dict | None:
  """`jax.jit(..., compiler_options=...)` for the default backend: on CPU, XLA's convolutions
  computed by its own (Eigen) kernels rather than YNNPACK's; None elsewhere, and where the
  installed jaxlib does not know the option.

  By default jax 0.10's CPU compiler sends dots, reductions and convolutions to YNNPACK.
  Dots and reductions run well there, but its convolutions did not: Zen 5 dev VM, 2 cores,
  batch 32, forward + d_input + d_kernel, ms (YNNPACK / Eigen): 3x3 at 56 px x 64 ch 153 / 57,
  at 7 px x 512 ch 63 / 43, 3x3/2 at 56 -> 28 px 96 / 84; d_kernel of the 7x7/2 stem at
  224 px 164 / 45; ResNet-50's distinct layers summed 2,843 / 1,229 (experiments/speed/README.md,
  "AMD Zen 5"). Only the list of library fusions changes: dots and reductions stay on YNNPACK.
  JAX accepts compiler options on a top-level `jax.jit` only (a nested one raises).

  None too where XLA_FLAGS sets the option itself, which then applies unchanged (e.g.
  `XLA_FLAGS=--xla_cpu_experimental_ynn_fusion_type=+individual_convolution` for jax's default).
  """
  if (jax.default_backend() != "cpu" or _YNN_FUSION_OPTION in os.environ.get("XLA_FLAGS", "")
      or not _cpu_accepts_ynn_fusion_option()):
    return None
  return _cpu_compiler_options()


def _cpu_compiler_options() -> dict:
  return {_YNN_FUSION_OPTION: _YNN_FUSION_TYPES_WITHOUT_CONVOLUTION}


@functools.cache
def _cpu_accepts_ynn_fusion_option() -> bool:
  """Whether this jaxlib's CPU compiler knows the option (it is experimental): one tiny
  compile, once per process."""
  options = _cpu_compiler_options()
  x = jax.ShapeDtypeStruct((1, 3, 3, 1), jnp.float32)
  k = jax.ShapeDtypeStruct((3, 3, 1, 1), jnp.float32)
  try:
    jax.jit(functools.partial(_xla_conv, strides=(1, 1), padding=((1, 1), (1, 1)))).lower(
        x, k).compile(compiler_options=options)
  except jax.errors.JaxRuntimeError:
    return False
  return True


def _xla_conv(x, kernel, strides, padding):
  """XLA convolution with NHWC / HWIO / NHWC layout."""
  return lax.conv_general_dilated(
      x, kernel, window_strides=strides, padding=padding,
      dimension_numbers=_DIMENSION_NUMBERS)


def _matmul_copy(x):
  """x, exactly, computed as a matmul: x viewed as [N, 8] times the 8 x 8 identity.

  XLA's CPU compiler fuses elementwise producers into their consumers, recomputing them
  there, but it cannot fuse anything into a dot. Reading this copy instead of x keeps x's
  producer out of the consumer at the price of one memory-bound pass (4-13 ms for the
  [32, 56, 56, 64]-[32, 28, 28, 128] layers on the Zen 5 dev VM). Each output is one
  product by 1 plus products by 0, so finite values are copied exactly (-0 may become +0);
  an infinite x would make its group of 8 NaN.

  Args:
    x: [..., C] with C a multiple of 8.
  """
  group = 8
  flat = x.reshape(-1, group)
  eye = jnp.eye(group, dtype=x.dtype)
  return lax.dot_general(flat, eye, (((1,), (0,)), ((), ()))).reshape(x.shape)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _xla_conv_copied_input(x, kernel, strides, padding):
  """XLA's convolution and its gradients, but d_kernel reads `_matmul_copy(x)`.

  XLA computes a k x k d_kernel as a convolution over x relaid out as [Ci, H, W, B], and it
  fused x's producer (BatchNorm, residual and ReLU; in ρ(x)'s basic blocks over the outputs
  of two Winograd convolutions, in their tile layout) into that relayout, recomputing it in
  transposed order: in a `jax.profiler` trace of the paper joint step on the Zen 5 dev VM,
  214 ms for the [32, 56, 56, 64] input of ρ(x)'s layer2_0/conv1, 86-91 ms at
  [32, 28, 28, 128], 27-58 ms for the DCG's layer2_0/conv2, where a plain relayout takes
  5-10 ms. See `_cpu_copies_kernel_grad_input`.
  """
  return _xla_conv(x, kernel, strides, padding)


def _xla_conv_copied_input_fwd(x, kernel, strides, padding):
  return _xla_conv(x, kernel, strides, padding), (x, kernel)


def _xla_conv_copied_input_bwd(strides, padding, residuals, dy):
  x, kernel = residuals
  _, x_vjp = jax.vjp(lambda x_: _xla_conv(x_, kernel, strides, padding), x)
  _, kernel_vjp = jax.vjp(lambda k_: _xla_conv(_matmul_copy(x), k_, strides, padding), kernel)
  return x_vjp(dy)[0], kernel_vjp(dy)[0]


_xla_conv_copied_input.defvjp(_xla_conv_copied_input_fwd, _xla_conv_copied_input_bwd)


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
  if kh == kw == 1 and not any(p for pair in padding for p in pair):
    # One matmul over the pixels, x [N, Ci]ᵀ @ dy [N, Co], with no transpose of x: inside a
    # training step XLA fused the producer of x (BatchNorm + residual + ReLU, recomputed) into
    # the transpose below and ran it in transposed order, 0.3-0.7 s per ResNet-50 layer at
    # batch 32; without it the DCG warm-up step went from 27.9 to 20.7 s on one Zen 4 core.
    xs = x[:, ::sh, ::sw][:, :ho, :wo]
    return lax.dot_general(xs.reshape(n, ci), dy.reshape(n, co), (((0,), (0,)), ((), ())),
                           preferred_element_type=jnp.float32).reshape(1, 1, ci, co)
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
  # Split into stride phases, [sh, sw, Ci, B, Hp/sh, Wp/sw]: tap (i, j) is then a unit-stride
  # window of phase (i % sh, j % sw) at offset (i // sh, j // sw); strided gathers in the minor
  # dimension were the slow part of the stride-2 layers. (For stride 1 this is a reshape.)
  xt = xt.reshape(ci, b, hp // sh, sh, wp // sw, sw)
  xt = jnp.transpose(xt, (3, 5, 0, 1, 2, 4))
  dy2 = dy.reshape(n, co)

  def kernel_row(_, i):
    """dK[i] as [kw·Ci, Co]: the row's kw tap windows stacked, [kw·Ci, N] @ dy [N, Co]."""
    taps = [lax.dynamic_slice(xt, (i % sh, j % sw, 0, 0, i // sh, j // sw),
                              (1, 1, ci, b, ho, wo)).reshape(ci, n) for j in range(kw)]
    cols = taps[0] if kw == 1 else jnp.concatenate(taps, axis=0)
    return None, jnp.matmul(cols, dy2, preferred_element_type=jnp.float32)

  # One kernel row per scan step, so that only one row's columns ([kw·Ci, N], 34 MB for the
  # 224 px stem at batch 32) are live at a time: unrolled as kh matmuls (chunks of rows),
  # XLA's CPU schedule kept all of them live at once, and this d_kernel's temporaries were
  # 256 MB for the stem, 171 MB for a 56 -> 28 px 3x3/2 layer of 128 channels, 58 MB for 7 px
  # at 512 channels; in the scan 54, 110 and 18 MB, at the same or better speed (Zen 5 dev
  # VM, d_kernel alone, batch 32: 88 -> 83, 72 -> 56, 23 -> 21 ms), and bit for bit the same.
  # The paper joint step with Intel's rules: temporaries 4.13 -> 3.70 GB, peak 8.8 -> 8.3 GB,
  # the same speed within the VM's drift (experiments/speed/README.md, "AMD Zen 5").
  _, rows = lax.scan(kernel_row, None, jnp.arange(kh))
  return rows.reshape(kh, kw, ci, co)


def _patches_conv(x, kernel, strides, padding):
  """The convolution as one matmul of its patch matrix, gradients by autodiff.

  cols [B·Ho·Wo, kh·kw·Ci] (the tap windows concatenated along channels) @ kernel
  [kh·kw·Ci, Co], accumulated in float32. Cheap only where the patch matrix is small, i.e.
  at a few output pixels, which is exactly where XLA's CPU convolution is slowest.
  """
  kh, kw, ci, co = kernel.shape
  sh, sw = strides
  b = x.shape[0]
  xp = jnp.pad(x, ((0, 0), padding[0], padding[1], (0, 0)))
  ho = (xp.shape[1] - kh) // sh + 1
  wo = (xp.shape[2] - kw) // sw + 1
  taps = [lax.slice(xp, (0, i, j, 0), (b, i + sh * (ho - 1) + 1, j + sw * (wo - 1) + 1, ci),
                    (1, sh, sw, 1)) for i in range(kh) for j in range(kw)]
  cols = jnp.concatenate(taps, axis=-1).reshape(b * ho * wo, kh * kw * ci)
  y = jnp.matmul(cols, kernel.reshape(kh * kw * ci, co), preferred_element_type=jnp.float32)
  return y.astype(x.dtype).reshape(b, ho, wo, co)


def _is_pointwise(kernel_shape, padding):
  """A 1x1 kernel without padding: the convolution is a matmul over channels."""
  return kernel_shape[0] == kernel_shape[1] == 1 and not any(p for pair in padding for p in pair)


def _pointwise_conv(x, kernel, strides):
  """A 1x1 unpadded convolution as one dot over channels: x[:, ::sh, ::sw] [B, Ho, Wo, Ci] ·
  kernel[0, 0] [Ci, Co] -> [B, Ho, Wo, Co], accumulated in float32.

  On the Zen 4 dev CPU XLA's convolution ran these layers at 73-91 GFLOP/s and the same
  product as a dot at 173-214 (ResNet-50 layers at 56 and 28 px, batch 32, 2 cores)."""
  sh, sw = strides
  xs = x[:, ::sh, ::sw] if (sh, sw) != (1, 1) else x
  y = lax.dot_general(xs, kernel[0, 0], (((3,), (0,)), ((), ())),
                      preferred_element_type=jnp.float32)
  return y.astype(x.dtype)


def _pointwise_input_grad(dy, kernel, x_shape, strides, dtype):
  """d_input of `_pointwise_conv`: dy [B, Ho, Wo, Co] · kernel[0, 0]ᵀ, placed back at the
  strided pixels (interior zero padding; rows and columns the stride skipped get zeros)."""
  sh, sw = strides
  _, ho, wo, _ = dy.shape
  dxs = lax.dot_general(dy, kernel[0, 0], (((3,), (1,)), ((), ())),
                        preferred_element_type=jnp.float32).astype(dtype)
  if (sh, sw) == (1, 1):
    return dxs
  return lax.pad(dxs, jnp.zeros((), dtype),
                 ((0, 0, 0), (0, x_shape[1] - (ho - 1) * sh - 1, sh - 1),
                  (0, x_shape[2] - (wo - 1) * sw - 1, sw - 1), (0, 0, 0)))


# Winograd F(m x m, 3x3) (Lavin & Gray, "Fast Algorithms for Convolutional Neural Networks",
# CVPR 2016): an m x m output tile of a stride-1 3x3 convolution is
#   Y = Aᵀ [(G g Gᵀ) ⊙ (Bᵀ d B)] A
# for the (m + 2) x (m + 2) input tile d and the kernel g, with the constant matrices below.
# Summed over input channels, the elementwise product becomes (m + 2)² matmuls [N, Ci] @
# [Ci, Co], N = B · tiles: (m + 2)² multiplications per m² outputs instead of 9 m², i.e. 2.25x
# fewer for m = 2 and 4x fewer for m = 4. F(2x2, 3x3)'s Bᵀ and Aᵀ hold only 0 and ±1 (the
# transforms are additions) and G halves; F(4x4, 3x3)'s coefficients reach ±8 and 1/24, which
# costs float32 accuracy (tests bound both).
_WINOGRAD_MATRICES = {
    2: dict(bt=((1, 0, -1, 0), (0, 1, 1, 0), (0, -1, 1, 0), (0, 1, 0, -1)),
            g=((1, 0, 0), (0.5, 0.5, 0.5), (0.5, -0.5, 0.5), (0, 0, 1)),
            at=((1, 1, 1, 0), (0, 1, -1, -1))),
    4: dict(bt=((4, 0, -5, 0, 1, 0), (0, -4, -4, 1, 1, 0), (0, 4, -4, -1, 1, 0),
                (0, -2, -1, 2, 1, 0), (0, 2, -1, -2, 1, 0), (0, 4, 0, -5, 0, 1)),
            g=((1 / 4, 0, 0), (-1 / 6, -1 / 6, -1 / 6), (-1 / 6, 1 / 6, -1 / 6),
               (1 / 24, 1 / 12, 1 / 6), (1 / 24, -1 / 12, 1 / 6), (0, 0, 1)),
            at=((1, 1, 1, 1, 1, 0), (0, 1, -1, 2, -2, 0), (0, 1, 1, 4, 4, 0),
                (0, 1, -1, 8, -8, 1))),
}

# 'auto' on CPU computes stride-1 3x3 layers whose output has at least this many pixels per
# image by Winograd (`_cpu_winograd_wins`), with F(4x4, 3x3) from _WINOGRAD_F4_MIN_SIDE pixels
# a side in float32 and F(2x2, 3x3) otherwise (`_winograd_tile`).
_WINOGRAD_MIN_OUTPUT_PIXELS = 14 * 14
_WINOGRAD_F4_MIN_SIDE = 28


def _winograd_tile(output_hw, dtype):
  """The output tile m for a Winograd layer: 4 where the output is at least 28 px a side and
  the layer computes in float32, else 2.

  On the Intel Xeon (AVX-512) dev CPU, 2 cores, batch 32, forward + both gradients:
  F(4x4) 185 ms against F(2x2) 223 ms at 56 px x 64 channels and 122 against 132 at 28 px x
  128; at 14 px x 256 F(2x2) won (109 against 130): a 14 px side is 3.5 tiles of 4 (the
  padded last tile wastes an eighth of the work) and N = B·tiles gets small. bfloat16 keeps
  F(2x2), whose transforms are additions only: F(4x4)'s coefficients up to 8 would magnify
  bfloat16's rounding of V."""
  if jnp.dtype(dtype) == jnp.float32 and min(output_hw) >= _WINOGRAD_F4_MIN_SIDE:
    return 4
  return 2


def _is_winograd_shape(kernel_shape, strides):
  """A 3x3 kernel at stride 1: what `_winograd_conv` computes."""
  return tuple(kernel_shape[:2]) == (3, 3) and tuple(strides) == (1, 1)


def _winograd_tiles(x_shape, padding, m):
  """(Ho, Wo, th, tw): the output size and the number of m x m output tiles per axis."""
  ho = x_shape[1] + sum(padding[0]) - 2
  wo = x_shape[2] + sum(padding[1]) - 2
  return ho, wo, -(-ho // m), -(-wo // m)


def _linear_combination(coefficients, terms):
  """Σ_k c_k · terms[k], skipping zero coefficients and multiplying only by c ∉ {1, -1}."""
  out = None
  for c, t in zip(coefficients, terms):
    if c == 0:
      continue
    if out is None:
      out = t if c == 1 else (-t if c == -1 else t * c)
    else:
      out = out + t if c == 1 else (out - t if c == -1 else out + t * c)
  return out


def _winograd_bt_1d(x, axis, tiles, m):
  """Bᵀ d along one axis, every tile at once: [.., m·tiles + 2, ..] -> (m+2) x [.., tiles, ..].

  Tile t reads d_k = x[m·t + k], k = 0..m+1, a strided slice of x for each k."""
  d = [lax.slice_in_dim(x, k, k + m * (tiles - 1) + 1, m, axis) for k in range(m + 2)]
  return [_linear_combination(row, d) for row in _WINOGRAD_MATRICES[m]["bt"]]


def _winograd_input_transform(x, padding, m):
  """V = Bᵀ d B for every input tile: x [B, H, W, Ci] -> V [(m+2)², B·th·tw, Ci] (x.dtype).

  Entry ξ·(m+2) + ν of V's first axis holds entry (ξ, ν) of every tile's transform."""
  b, _, _, ci = x.shape
  _, _, th, tw = _winograd_tiles(x.shape, padding, m)
  # Pad to exactly m·tiles + 2 rows and columns: tiles step by m and overlap by 2.
  xp = lax.pad(x, jnp.zeros((), x.dtype),
               ((0, 0, 0), (padding[0][0], m * th + 2 - x.shape[1] - padding[0][0], 0),
                (padding[1][0], m * tw + 2 - x.shape[2] - padding[1][0], 0), (0, 0, 0)))
  # Meant to make xp one buffer that all (m + 2)² terms read, so that x's producer (BatchNorm
  # and ReLU in a training step) is not fused into each term. JAX 0.10's CPU compiler removes
  # barriers before fusion, so it does not do that there (no whole-step speed difference was
  # resolved on the Intel dev VM either way).
  xp = lax.optimization_barrier(xp)
  # Both passes on whole stacked arrays: the rows pass as one [m+2, B, th, W', Ci] array, the
  # columns pass over it, stacked to [m+2 (ξ), m+2 (ν), B, th, tw, Ci]. Applying the columns
  # pass to each row separately gave XLA (m+2)² fusions, each recomputing its row from the
  # padded input: at 56 px x 64 channels, batch 32, F(4x4), 37 fusions and 11-18 ms against 3
  # fusions and 8.5-10 ms (Zen 5 dev VM; bit for bit the same V).
  rows = jnp.stack(_winograd_bt_1d(xp, 1, th, m))
  v = jnp.stack(_winograd_bt_1d(rows, 3, tw, m), axis=1)
  return v.reshape((m + 2) ** 2, b * th * tw, ci)


def _winograd_kernel_transform(kernel, m):
  """U = G g Gᵀ: kernel [3, 3, Ci, Co] -> float32 [(m+2)², Ci, Co]."""
  g = jnp.asarray(_WINOGRAD_MATRICES[m]["g"], jnp.float32)
  u = jnp.einsum("ai,bj,ijco->abco", g, g, kernel.astype(jnp.float32),
                 precision=lax.Precision.HIGHEST)
  return u.reshape((m + 2) ** 2, kernel.shape[2], kernel.shape[3])


def _winograd_output_transform(mt, x_shape, padding, m):
  """Y = Aᵀ M A per tile, tiles side by side: mt [(m+2)², B·th·tw, Co] -> [B, Ho, Wo, Co]."""
  b, a = x_shape[0], m + 2
  ho, wo, th, tw = _winograd_tiles(x_shape, padding, m)
  at = _WINOGRAD_MATRICES[m]["at"]
  mt = mt.reshape(a, a, b, th, tw, mt.shape[-1])
  rows = [_linear_combination(r, [mt[k] for k in range(a)]) for r in at]  # m x [a, B, th, tw, Co]
  y = [jnp.stack([_linear_combination(c, [row[k] for k in range(a)]) for c in at], axis=3)
       for row in rows]                                                  # m x [B, th, tw, m, Co]
  y = jnp.stack(y, axis=2)                                               # [B, th, m, tw, m, Co]
  return y.reshape(b, m * th, m * tw, mt.shape[-1])[:, :ho, :wo]


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _winograd_conv(x, kernel, padding, m):
  """Stride-1 3x3 convolution by Winograd F(m x m, 3x3); gradients by the same transforms.

  M = V U is (m+2)² matmuls [N, Ci] @ [Ci, Co] accumulated in float32. The backward pass
  recomputes V from x (additions) instead of saving it ((m+2)²/m² times the size of x):
  dM = A dY Aᵀ per tile, d_kernel = Gᵀ (Vᵀ dM) G, and d_input the same forward Winograd
  convolution of dY with the flipped kernel (`_winograd_input_grad`), i.e. (m+2)² matmuls each
  for d_input and d_kernel too."""
  mt = _winograd_product(_winograd_input_transform(x, padding, m),
                         _winograd_kernel_transform(kernel, m))
  return _winograd_output_transform(mt, x.shape, padding, m).astype(x.dtype)


def _winograd_product(v, u):
  """M = V U per transform entry: [A², N, Ci] @ [A², Ci, Co] -> float32 [A², N, Co]."""
  return lax.dot_general(v, u.astype(v.dtype), (((2,), (1,)), ((0,), (0,))),
                         preferred_element_type=jnp.float32)


def _winograd_conv_fwd(x, kernel, padding, m):
  return _winograd_conv(x, kernel, padding, m), (x, kernel)


def _winograd_output_transform_t(dy, x_shape, padding, m):
  """The transpose of `_winograd_output_transform`: dM = A dY Aᵀ for every m x m tile of the
  cotangent dy [B, Ho, Wo, Co] (zero-padded to whole tiles) -> float32 [(m+2)², B·th·tw, Co].

  Tiles of dY do not overlap, so this is a reshape and additions (jax.linear_transpose of the
  forward transform went through the stack/slice transposes and was 2-10x slower)."""
  b, co, a = x_shape[0], dy.shape[-1], m + 2
  ho, wo, th, tw = _winograd_tiles(x_shape, padding, m)
  dy = jnp.pad(dy.astype(jnp.float32), ((0, 0), (0, m * th - ho), (0, m * tw - wo), (0, 0)))
  dy = lax.optimization_barrier(dy).reshape(b, th, m, tw, m, co)   # as in the input transform
  at = _WINOGRAD_MATRICES[m]["at"]
  # A column ξ of A = row ξ of Aᵀ's transpose: dM_ξ = Σ_i Aᵀ[i, ξ] dY_i.
  a_cols = [[at[i][xi] for i in range(m)] for xi in range(a)]
  # Stacked passes, as in `_winograd_input_transform` (36 fusions -> 2 at 56 px, F(4x4)).
  rows = jnp.stack([_linear_combination(c, [dy[:, :, i] for i in range(m)])
                    for c in a_cols])                                 # [A, B, th, tw, m, Co]
  dm = jnp.stack([_linear_combination(c, [rows[:, :, :, :, j] for j in range(m)])
                  for c in a_cols], axis=1)                           # [A, A, B, th, tw, Co]
  return dm.reshape(a * a, b * th * tw, co)


def _winograd_input_grad(dy, dm, kernel, x_shape, padding, m):
  """d_input of a stride-1 3x3 convolution: itself a stride-1 3x3 convolution of dy with the
  kernel flipped and its channel axes swapped, padded by 2 - p on each side, so it runs on
  the forward Winograd path. (Paddings above 2 would need a crop; they go through
  jax.linear_transpose of the input transform instead, from dm = A dY Aᵀ of
  `_winograd_output_transform_t`, which the caller computes for d_kernel anyway.)"""
  pads = [p for pair in padding for p in pair]
  flipped = jnp.transpose(kernel[::-1, ::-1], (0, 1, 3, 2))
  if max(pads) <= 2:
    grad_padding = tuple((2 - lo, 2 - hi) for lo, hi in padding)
    # The output size is H + pad_lo + pad_hi - 2 = x_shape's H: the stride-1 identity above.
    return _winograd_conv(dy, flipped, grad_padding, m)
  dv = lax.dot_general(dm, _winograd_kernel_transform(kernel, m).astype(dy.dtype),
                       (((2,), (2,)), ((0,), (0,))),
                       preferred_element_type=jnp.float32).astype(dy.dtype)
  (dx,) = jax.linear_transpose(lambda x_: _winograd_input_transform(x_, padding, m),
                               jax.ShapeDtypeStruct(x_shape, dy.dtype))(dv)
  return dx


def _winograd_conv_bwd(padding, m, residuals, dy):
  x, kernel = residuals
  ci, co = kernel.shape[2], kernel.shape[3]
  dm = _winograd_output_transform_t(dy, x.shape, padding, m).astype(x.dtype)
  dx = _winograd_input_grad(dy.astype(x.dtype), dm, kernel.astype(x.dtype), x.shape, padding, m)
  v = _winograd_input_transform(x, padding, m)
  du = lax.dot_general(v, dm, (((1,), (1,)), ((0,), (0,))),
                       preferred_element_type=jnp.float32)                  # [A², Ci, Co]
  g = jnp.asarray(_WINOGRAD_MATRICES[m]["g"], jnp.float32)
  dk = jnp.einsum("ai,bj,abco->ijco", g, g, du.reshape(m + 2, m + 2, ci, co),
                  precision=lax.Precision.HIGHEST)
  return dx.astype(x.dtype), dk.astype(kernel.dtype)


_winograd_conv.defvjp(_winograd_conv_fwd, _winograd_conv_bwd)


def _im2col_forward(x, kernel, strides, padding):
  if _is_pointwise(kernel.shape, padding):
    return _pointwise_conv(x, kernel, strides)
  return _xla_conv(x, kernel, strides, padding)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _im2col_conv(x, kernel, strides, padding):
  return _im2col_forward(x, kernel, strides, padding)


def _im2col_conv_fwd(x, kernel, strides, padding):
  return _im2col_forward(x, kernel, strides, padding), (x, kernel)


def _im2col_conv_bwd(strides, padding, residuals, dy):
  x, kernel = residuals
  if _is_pointwise(kernel.shape, padding):
    dx = _pointwise_input_grad(dy, kernel, x.shape, strides, x.dtype)
  else:
    # d_input: XLA's transposed convolution is already as fast as the forward
    # pass; the forward value computed inside this vjp is dead and removed.
    _, x_vjp = jax.vjp(lambda x_: _xla_conv(x_, kernel, strides, padding), x)
    (dx,) = x_vjp(dy)
    if jax.default_backend() == "cpu" and _cpu_copies_kernel_grad_input(kernel.shape):
      # `_kernel_grad` transposes x to [Ci, B, H, W], and XLA fused x's producer into that
      # transpose just as into its own d_kernel's relayout (`_xla_conv_copied_input`). With an
      # Intel CPU's rules forced on the Zen 5 dev VM (paper joint step, calls alternating in
      # one process, 8 pairs, median of the paired differences) the step was 0.21 and 0.10 s
      # faster with the copy in two runs (6.51 -> 6.30 s, 6.74 -> 6.70 s); the warm-up step,
      # 0.01 s (3.89 s both).
      x = _matmul_copy(x)
  dk = _kernel_grad(x, dy, kernel.shape, strides, padding)
  return dx, dk.astype(kernel.dtype)


_im2col_conv.defvjp(_im2col_conv_fwd, _im2col_conv_bwd)


def _cpu_im2col_wins(kernel_shape, strides, output_pixels=None):
  """Whether the matmul d_kernel beat XLA's for this layer on the dev CPUs.

  1x1 kernels, on every CPU: measured with experiments/speed/conv_benchmark.py (ResNet-18/50 at
  224 px, batch 32, 2-core Zen 3 VM), XLA's d_kernel runs every 1x1 convolution at 2-30
  GFLOP/s and the matmul path is 2.5-10x faster there; on the Zen 4 (AVX-512) dev CPU the 1x1
  forward and d_input as dots then halved those layers' time again (`_pointwise_conv`;
  warm-up step 8.0 -> 7.4 s, 2 cores). On those AMD CPUs the im2col copies of 3x3 and 7x7
  kernels cost about what they save (0.6-1.0x on the stride-2 layers, 0.96x on the stem), so
  larger kernels keep XLA's convolution there. On the Zen 5 (AVX-512) dev CPU the im2col
  d_kernel won on the stem and the 7-14 px k x k layers alone (1.05-1.44x) but lost at
  56 -> 28 px, and neither Intel's rule nor one fitted to those layers changed a whole warm-up
  or joint step beyond its 2-5 % call-to-call spread (experiments/speed/README.md, "AMD Zen 5").
  Re-tried after the im2col d_kernel's copied input and row loop: Intel's rule at most 2-3 %
  faster there, not resolved from the VM's drift for the joint step, so AMD keeps XLA's.

  Larger kernels on an Intel CPU, from 7 x 7 output pixels on: on the Intel Xeon (AVX-512,
  AMX) dev CPU XLA's d_kernel was much slower (the 224 px stem's 516 ms against the im2col
  matmul's 223; the stride-2 3x3 layers 154, 140, 80 ms against 117, 92, 60), forward +
  backward 582 -> 252 ms on the stem and 1.2-1.5x on the stride-2 and 7 px 3x3 layers; the
  local net's 4 x 4-pixel 3x3 layer was 2.7x slower (8 against 22 ms), hence the floor.

  Args:
    kernel_shape: (kh, kw, Ci, Co).
    strides: (sh, sw); unused today, kept so the rule can depend on it.
    output_pixels: Ho·Wo, or None when unknown.

  Returns:
    True to use the im2col backward.
  """
  del strides
  kh, kw, _, _ = kernel_shape
  if kh == 1 and kw == 1:
    return True
  return (_cpu_vendor() == "GenuineIntel" and output_pixels is not None
          and output_pixels >= _INTEL_IM2COL_MIN_OUTPUT_PIXELS)


def _cpu_patches_win(kernel_shape, output_pixels):
  """Whether the patch matmul beat XLA's convolution for this layer on CPU.

  XLA's CPU convolution (jax 0.10) falls off its fast path when the output has a handful of
  pixels: the DCG's local ResNet-50 runs on 32 px crops, so its layer 3 and 4 3x3 convolutions
  have 2x2 and 1x1 outputs, and there XLA took 117-266 ms for the forward pass of a batch of
  192 crops (about 1-4 GFLOP/s), the patch matmul 5-10 ms; forward + backward 100-500 ms
  against 15-30 ms (experiments/speed/README.md, "CPU convolutions"). From 4x4 outputs on XLA is as
  fast or faster, and 1x1 kernels are plain matmuls already.

  Args:
    kernel_shape: (kh, kw, Ci, Co).
    output_pixels: Ho·Wo, or None when unknown.
  """
  kh, kw, _, _ = kernel_shape
  return (output_pixels is not None and kh * kw > 1
          and output_pixels <= _PATCHES_MAX_OUTPUT_PIXELS)


# 'auto' on an Intel CPU computes the k x k layers that neither Winograd nor the patch matmul
# take with the im2col d_kernel from this many output pixels on (`_cpu_im2col_wins`).
_INTEL_IM2COL_MIN_OUTPUT_PIXELS = 7 * 7


@functools.cache
def _cpu_vendor():
  """The CPU's vendor string ('GenuineIntel', 'AuthenticAMD', '' where unknown), read once."""
  return host.cpu_description()["vendor"]


def _cpu_winograd_wins(kernel_shape, strides, output_pixels):
  """Whether Winograd beat XLA's convolution for this layer on CPU: stride-1 3x3 kernels with
  at least 14 x 14 output pixels.

  Intel Xeon (AVX-512, AMX) dev CPU, 2 cores, batch 32, forward + d_input + d_kernel, ms
  (XLA / 'im2col' / Winograd): 56 px x 64 ch 390 / 304 / 185, 28 px x 128 ch 225 / 163 / 122,
  14 px x 256 ch 169 / 155 / 109, but 7 px x 512 ch 142 / 172 / 217: at 7 px the tiles cover
  8 x 8 pixels (a third more work) and N = B·16 tiles is too small for the matmuls to gain
  what the transforms cost (experiments/speed/README.md, "Winograd").

  Args:
    kernel_shape: (kh, kw, Ci, Co).
    strides: (sh, sw).
    output_pixels: Ho·Wo, or None when unknown.
  """
  return (_is_winograd_shape(kernel_shape, strides) and output_pixels is not None
          and output_pixels >= _WINOGRAD_MIN_OUTPUT_PIXELS)


def _cpu_copies_kernel_grad_input(kernel_shape):
  """Whether a k x k d_kernel on CPU reads a matmul copy of x: XLA's under 'auto'
  (`_xla_conv_copied_input`) and the im2col one (`_im2col_conv_bwd`), for 16-128 input
  channels (a multiple of 8).

  Those are the layers where the fused relayout was slow (`_xla_conv_copied_input`). Zen 5 dev
  VM, paper configuration, batch 32, the two compiled steps' calls alternating in one process,
  8-10 pairs, median of the paired differences: joint step 0.18 and 0.06 s faster under glibc
  (6.90 -> 6.75 s, 6.81 -> 6.70 s), 0.02 s under TCMalloc (within its spread); DCG warm-up step
  +0.03 and -0.01 s (no change). Copying for every XLA k x k layer instead also copied the stems
  (3 channels, 13 ms at 224 px) and the 256-512-channel layers, whose relayouts were cheap: the
  warm-up step lost 0.12 s.

  Args:
    kernel_shape: (kh, kw, Ci, Co).
  """
  kh, kw, ci, _ = kernel_shape
  return (kh * kw > 1 and ci % 8 == 0
          and _COPY_INPUT_MIN_CHANNELS <= ci <= _COPY_INPUT_MAX_CHANNELS)


# Input channels for which a k x k d_kernel on CPU (XLA's under 'auto', and im2col's) reads a
# copy of x (`_cpu_copies_kernel_grad_input`).
_COPY_INPUT_MIN_CHANNELS = 16
_COPY_INPUT_MAX_CHANNELS = 128


def resolve_impl(impl="auto", kernel_shape=None, strides=(1, 1), output_pixels=None):
  """Maps 'auto' to the implementation used on the current default backend.

  Args:
    impl: 'auto', 'xla', 'im2col', 'patches' or 'winograd'.
    kernel_shape: optional (kh, kw, Ci, Co); with it, 'auto' on CPU picks
      per layer shape, without it it names the CPU default ('im2col').
    strides: (sh, sw), used with kernel_shape.
    output_pixels: Ho·Wo of one image, used with kernel_shape.

  Returns:
    'xla', 'im2col', 'patches' or 'winograd'.
  """
  if impl not in _IMPLS:
    raise ValueError(f"impl must be one of {_IMPLS}, got {impl!r}")
  if impl != "auto":
    return impl
  if jax.default_backend() != "cpu":
    return "xla"
  if kernel_shape is not None and _cpu_patches_win(kernel_shape, output_pixels):
    return "patches"
  if kernel_shape is not None and _cpu_winograd_wins(kernel_shape, strides, output_pixels):
    return "winograd"
  if kernel_shape is None or _cpu_im2col_wins(kernel_shape, strides, output_pixels):
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
    impl: 'xla' (plain lax conv), 'im2col' (matmul d_kernel accumulated in
      float32, on CPU over a copy of x for 16-128 input channels; XLA forward and
      d_input, except for unpadded 1x1 kernels, where both are dots too),
      'patches' (one patch matmul, for layers with few output pixels), 'winograd'
      (Winograd F(2x2, 3x3) or F(4x4, 3x3) for stride-1 3x3 kernels, forward and
      both gradients, see `_winograd_tile`; other layers as 'im2col'), or 'auto'
      (on CPU 'patches', 'winograd' or 'im2col' for the layer shapes where they
      measured faster, see `_cpu_patches_win`, `_cpu_winograd_wins` and
      `_cpu_im2col_wins`, and 'xla' for the rest, its d_kernel reading a copy of
      x for 16-128 input channels, see `_cpu_copies_kernel_grad_input`; 'xla' on
      every other backend).

  Returns:
    [B, H', W', Co] with H' = (H + top + bottom - kh) // sh + 1, same for W'.
  """
  strides = tuple(int(s) for s in strides)
  padding = tuple((int(lo), int(hi)) for lo, hi in padding)
  if any(p < 0 for pair in padding for p in pair):
    raise ValueError(f"padding must be non-negative, got {padding}")
  ho = (x.shape[1] + sum(padding[0]) - kernel.shape[0]) // strides[0] + 1
  wo = (x.shape[2] + sum(padding[1]) - kernel.shape[1]) // strides[1] + 1
  chosen = resolve_impl(impl, kernel.shape, strides, ho * wo)
  if chosen == "xla":
    if (impl == "auto" and jax.default_backend() == "cpu"
        and _cpu_copies_kernel_grad_input(kernel.shape)):
      return _xla_conv_copied_input(x, kernel, strides, padding)
    return _xla_conv(x, kernel, strides, padding)
  if chosen == "patches":
    return _patches_conv(x, kernel, strides, padding)
  if chosen == "winograd" and _is_winograd_shape(kernel.shape, strides):
    return _winograd_conv(x, kernel, padding, _winograd_tile((ho, wo), x.dtype))
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



# ----------------------------------------------------------------------------- max pooling


def _pool_taps(xp, window, strides, out_hw):
  """The kh·kw strided windows of padded xp [B, Hp, Wp, C], each [B, Ho, Wo, C], in
  row-major window order."""
  (kh, kw), (sh, sw), (ho, wo) = window, strides, out_hw
  b, _, _, c = xp.shape
  return [lax.slice(xp, (0, i, j, 0), (b, i + sh * (ho - 1) + 1, j + sw * (wo - 1) + 1, c),
                    (1, sh, sw, 1)) for i in range(kh) for j in range(kw)]


def _pool_geometry(x_shape, window, strides, padding):
  hp = x_shape[1] + sum(padding[0])
  wp = x_shape[2] + sum(padding[1])
  return (hp, wp), ((hp - window[0]) // strides[0] + 1, (wp - window[1]) // strides[1] + 1)


@functools.partial(jax.custom_vjp, nondiff_argnums=(1, 2, 3))
def _taps_max_pool(x, window, strides, padding):
  xp = jnp.pad(x, ((0, 0), padding[0], padding[1], (0, 0)), constant_values=-jnp.inf)
  _, out_hw = _pool_geometry(x.shape, window, strides, padding)
  return functools.reduce(jnp.maximum, _pool_taps(xp, window, strides, out_hw))


def _taps_max_pool_fwd(x, window, strides, padding):
  y = _taps_max_pool(x, window, strides, padding)
  return y, (x, y)


def _taps_max_pool_bwd(window, strides, padding, residuals, dy):
  """Routes each output's gradient to the first maximum of its window (row-major order),
  as XLA's select-and-scatter for max pooling does."""
  x, y = residuals
  (hp, wp), (ho, wo) = _pool_geometry(x.shape, window, strides, padding)
  xp = jnp.pad(x, ((0, 0), padding[0], padding[1], (0, 0)), constant_values=-jnp.inf)
  kw, (sh, sw) = window[1], strides
  taken = jnp.zeros(y.shape, bool)
  dxp = jnp.zeros(xp.shape, dy.dtype)
  zero = jnp.zeros((), dy.dtype)
  for k, tap in enumerate(_pool_taps(xp, window, strides, (ho, wo))):
    i, j = divmod(k, kw)
    first = (tap == y) & ~taken
    taken = taken | first
    # Place tap k's share back at its input positions: offset (i, j), stride (sh, sw).
    dxp = dxp + lax.pad(jnp.where(first, dy, zero), zero,
                        ((0, 0, 0), (i, hp - i - sh * (ho - 1) - 1, sh - 1),
                         (j, wp - j - sw * (wo - 1) - 1, sw - 1), (0, 0, 0)))
  top, left = padding[0][0], padding[1][0]
  return (dxp[:, top:top + x.shape[1], left:left + x.shape[2]],)


_taps_max_pool.defvjp(_taps_max_pool_fwd, _taps_max_pool_bwd)


def max_pool(x, window=(3, 3), strides=(2, 2), padding=((1, 1), (1, 1)), impl="auto"):
  """Max pooling of NHWC x with -inf padding (torch MaxPool2d), fast backward on CPU.

  Equal to `flax.linen.max_pool` in value and gradient (the gradient goes to the first
  maximum of each window). XLA's CPU gradient of a reduce-window max builds index (iota)
  buffers and a select-and-scatter: 1.6 s of a 25 s ResNet-50 joint training step at batch
  32 on one core. 'taps' takes the maximum of the kh·kw strided windows and routes the
  gradient with one masked pad per window instead. 'auto' is 'taps' on CPU (any impl other
  than 'xla' is, so `model.conv_impl` can be passed through), XLA's elsewhere.

  Args:
    x: [B, H, W, C].
    window, strides: (kh, kw), (sh, sw).
    padding: ((top, bottom), (left, right)).
    impl: 'auto', 'xla' or any `conv2d` impl (meaning 'taps').

  Returns:
    [B, Ho, Wo, C].
  """
  window, strides = tuple(window), tuple(strides)
  padding = tuple((int(lo), int(hi)) for lo, hi in padding)
  if resolve_impl(impl) == "xla":
    return lax.reduce_window(x, -jnp.inf, lax.max, (1,) + window + (1,), (1,) + strides + (1,),
                             ((0, 0),) + padding + ((0, 0),))
  return _taps_max_pool(x, window, strides, padding)
