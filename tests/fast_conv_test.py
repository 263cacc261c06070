"""fast_conv.conv2d must equal lax.conv_general_dilated, values and gradients."""

import re

import jax
from jax import lax
import jax.numpy as jnp
import numpy as np
import pytest

from diffmic_jax.nn import fast_conv

# (name, input [B, H, W, Ci], kernel [kh, kw, Ci, Co], strides, padding): the
# conv kinds of a torchvision ResNet-18/50, at tiny sizes, plus odd sizes
# where a stride does not divide the padded input and asymmetric padding.
_CASES = [
    ("stem_7x7_s2_p3", (2, 12, 12, 3), (7, 7, 3, 8), (2, 2), ((3, 3), (3, 3))),
    ("3x3_s1_p1", (2, 6, 6, 8), (3, 3, 8, 8), (1, 1), ((1, 1), (1, 1))),
    ("3x3_s2_p1", (2, 7, 7, 4), (3, 3, 4, 8), (2, 2), ((1, 1), (1, 1))),
    ("1x1_s1", (2, 5, 5, 8), (1, 1, 8, 16), (1, 1), ((0, 0), (0, 0))),
    ("1x1_s2", (2, 7, 7, 8), (1, 1, 8, 16), (2, 2), ((0, 0), (0, 0))),
    ("3x3_s2_rect_asym", (3, 9, 6, 5), (3, 2, 5, 4), (2, 1), ((0, 2), (1, 0))),
    # The DCG local net's last layers on 32 px crops: 1x1 and 2x2 outputs ('auto' on CPU:
    # the patch matmul).
    ("3x3_s2_p1_to_1x1", (3, 2, 2, 8), (3, 3, 8, 16), (2, 2), ((1, 1), (1, 1))),
    ("3x3_s1_p1_2x2", (3, 2, 2, 8), (3, 3, 8, 8), (1, 1), ((1, 1), (1, 1))),
    # Winograd F(2x2, 3x3) tiles: odd output sizes (a half-empty last tile), unpadded and
    # asymmetric padding, a rectangular input.
    ("3x3_s1_p1_odd_rect", (2, 7, 5, 8), (3, 3, 8, 4), (1, 1), ((1, 1), (1, 1))),
    ("3x3_s1_valid_asym", (2, 9, 8, 3), (3, 3, 3, 5), (1, 1), ((0, 2), (1, 0))),
    # 16 input channels: on CPU the k x k d_kernel (XLA's under 'auto', and im2col's) reads a
    # matmul copy of x (`_cpu_copies_kernel_grad_input`).
    ("3x3_s2_p1_c16", (2, 7, 7, 16), (3, 3, 16, 8), (2, 2), ((1, 1), (1, 1))),
]
_IDS = [c[0] for c in _CASES]

_DN = ("NHWC", "HWIO", "NHWC")


def _ref_conv(x, kernel, strides, padding):
  return lax.conv_general_dilated(x, kernel, strides, padding,
                                  dimension_numbers=_DN,
                                  precision=lax.Precision.HIGHEST)


def _inputs(x_shape, k_shape, dtype, seed=0):
  kx, kk, kd = jax.random.split(jax.random.PRNGKey(seed), 3)
  x = jax.random.normal(kx, x_shape, jnp.float32)
  w = jax.random.normal(kk, k_shape, jnp.float32) / np.sqrt(
      k_shape[0] * k_shape[1] * k_shape[2])
  return x.astype(dtype), w.astype(dtype), kd


def _value_and_grads(conv_fn, x, w, dy):
  y, vjp = jax.vjp(conv_fn, x, w)
  dx, dw = vjp(dy)
  return y, dx, dw


def _assert_close(got, want, rtol, atol):
  np.testing.assert_allclose(np.asarray(got, np.float32),
                             np.asarray(want, np.float32), rtol=rtol,
                             atol=atol)


@pytest.mark.parametrize("impl", ["im2col", "patches", "winograd", "auto"])
@pytest.mark.parametrize("name,x_shape,k_shape,strides,padding", _CASES,
                         ids=_IDS)
def test_matches_lax_float32(name, x_shape, k_shape, strides, padding, impl):
  del name
  x, w, kd = _inputs(x_shape, k_shape, jnp.float32)
  y_ref = _ref_conv(x, w, strides, padding)
  dy = jax.random.normal(kd, y_ref.shape)

  fn = jax.jit(lambda a, b: _value_and_grads(
      lambda x_, w_: fast_conv.conv2d(x_, w_, strides, padding, impl=impl),
      a, b, dy))
  y, dx, dw = fn(x, w)
  y_r, dx_r, dw_r = jax.jit(lambda a, b: _value_and_grads(
      lambda x_, w_: _ref_conv(x_, w_, strides, padding), a, b, dy))(x, w)

  assert y.shape == y_r.shape and y.dtype == jnp.float32
  assert dx.shape == x.shape and dw.shape == w.shape
  assert dw.dtype == jnp.float32
  _assert_close(y, y_r, 1e-5, 1e-5)
  _assert_close(dx, dx_r, 1e-5, 1e-5)
  _assert_close(dw, dw_r, 1e-5, 1e-4)


@pytest.mark.parametrize("impl", ["im2col", "patches", "winograd"])
@pytest.mark.parametrize("name,x_shape,k_shape,strides,padding", _CASES,
                         ids=_IDS)
def test_matches_lax_bfloat16(name, x_shape, k_shape, strides, padding, impl):
  """bf16 activations, f32 params cast to bf16 inside (mixed precision)."""
  del name
  x, w32, kd = _inputs(x_shape, k_shape, jnp.float32)
  xb = x.astype(jnp.bfloat16)
  y_shape = _ref_conv(x, w32, strides, padding).shape
  dy = jax.random.normal(kd, y_shape).astype(jnp.bfloat16)

  def grads(impl):
    def f(x_, w_):
      y = fast_conv.conv2d(x_, w_.astype(jnp.bfloat16), strides, padding,
                           impl=impl)
      return jnp.sum(y.astype(jnp.float32) * dy.astype(jnp.float32)), y
    (_, y), g = jax.value_and_grad(f, argnums=(0, 1), has_aux=True)(xb, w32)
    return y, g

  y, (dx, dw) = jax.jit(lambda: grads(impl))()
  assert y.dtype == jnp.bfloat16
  assert dx.dtype == jnp.bfloat16 and dw.dtype == jnp.float32

  # Reference: the same maths in float32 on the bf16-rounded operands.
  xr = xb.astype(jnp.float32)
  wr = w32.astype(jnp.bfloat16).astype(jnp.float32)
  y_r, dx_r, dw_r = _value_and_grads(
      lambda x_, w_: _ref_conv(x_, w_, strides, padding), xr, wr,
      dy.astype(jnp.float32))
  scale = lambda a: float(jnp.max(jnp.abs(a)))
  _assert_close(y, y_r, 2e-2, 2e-2 * scale(y_r))
  _assert_close(dx, dx_r, 2e-2, 2e-2 * scale(dx_r))
  # d_kernel is accumulated in float32, so it is as close as the inputs allow.
  _assert_close(dw, dw_r, 1e-2, 1e-2 * scale(dw_r))

  # And the XLA path gives the same within bf16 rounding ('im2col' keeps XLA's forward and
  # d_input for k x k kernels, and its 1x1 dots accumulate in float32 as XLA's CPU conv
  # does, so those are identical here; 'winograd' is 'im2col' on the layers it does not
  # cover).
  y_x, (dx_x, dw_x) = jax.jit(lambda: grads("xla"))()
  winograd_layer = fast_conv._is_winograd_shape(k_shape, strides)  # pylint: disable=protected-access
  exact = 0 if impl == "im2col" or (impl == "winograd" and not winograd_layer) else 1
  _assert_close(y, y_x, 2e-2 * exact, 2e-2 * exact * scale(y_r))
  _assert_close(dx, dx_x, 2e-2 * exact, 2e-2 * exact * scale(dx_r))
  _assert_close(dw, dw_x, 2e-2, 2e-2 * scale(dw_r))


@pytest.mark.parametrize("impl", ["im2col", "patches", "winograd"])
@pytest.mark.parametrize("name,x_shape,k_shape,strides,padding",
                         [_CASES[i] for i in (0, 1, 2, 4, 6, 9, 10)],
                         ids=[_IDS[i] for i in (0, 1, 2, 4, 6, 9, 10)])
def test_vmap_of_grad(name, x_shape, k_shape, strides, padding, impl):
  """Per-example gradients: vmap over grad, both x and the kernel batched."""
  del name
  n = 3
  x, w, _ = _inputs((n,) + x_shape, k_shape, jnp.float32)
  ws = jnp.stack([w * (i + 1.0) for i in range(n)])

  def loss(conv):
    return lambda x_, w_: jnp.sum(jnp.tanh(conv(x_, w_, strides, padding)))

  ours = lambda x_, w_, s, p: fast_conv.conv2d(x_, w_, s, p, impl=impl)
  got = jax.jit(jax.vmap(jax.grad(loss(ours), argnums=(0, 1))))(x, ws)
  want = jax.jit(jax.vmap(jax.grad(loss(_ref_conv), argnums=(0, 1))))(x, ws)
  for g, r in zip(got, want):
    _assert_close(g, r, 1e-5, 1e-4)

  # vmap of the forward with the kernel shared (in_axes=None).
  y = jax.vmap(lambda a: ours(a, w, strides, padding))(x)
  _assert_close(y, jax.vmap(lambda a: _ref_conv(a, w, strides, padding))(x),
                1e-5, 1e-5)


def test_second_order_grad_and_grad_of_jit():
  """jvp-of-vjp (e.g. a gradient penalty) is unsupported by custom_vjp, but
  grad of a jitted conv and reverse-over-reverse are."""
  x, w, _ = _inputs((2, 6, 6, 4), (3, 3, 4, 4), jnp.float32)
  pad = ((1, 1), (1, 1))
  conv = jax.jit(lambda a, b: fast_conv.conv2d(a, b, (1, 1), pad, "im2col"))
  g = jax.grad(lambda b: jnp.sum(conv(x, b) ** 2))(w)
  g_r = jax.grad(lambda b: jnp.sum(_ref_conv(x, b, (1, 1), pad) ** 2))(w)
  _assert_close(g, g_r, 1e-5, 1e-4)

  hv = jax.grad(lambda b: jnp.sum(jax.grad(
      lambda b_: jnp.sum(conv(x, b_) ** 2))(b)))(w)
  hv_r = jax.grad(lambda b: jnp.sum(jax.grad(
      lambda b_: jnp.sum(_ref_conv(x, b_, (1, 1), pad) ** 2))(b)))(w)
  _assert_close(hv, hv_r, 1e-4, 1e-3)


def test_winograd_computes_stride1_3x3_without_xla_convolution():
  """'winograd' must really take the F(2x2, 3x3) path (16 batched matmuls, no convolution op)
  for stride-1 3x3 kernels, forward and both gradients, and leave other layers to 'im2col'."""
  x, w, _ = _inputs((2, 6, 6, 4), (3, 3, 4, 8), jnp.float32)
  pad = ((1, 1), (1, 1))
  loss = lambda s: (lambda a, b: jnp.sum(fast_conv.conv2d(a, b, s, pad, "winograd") ** 2))
  jaxpr = str(jax.make_jaxpr(jax.grad(loss((1, 1)), argnums=(0, 1)))(x, w))
  assert "conv_general_dilated" not in jaxpr
  assert jaxpr.count("dot_general") >= 3                  # forward, d_input, d_kernel
  strided = str(jax.make_jaxpr(jax.grad(loss((2, 2)), argnums=(0, 1)))(x, w))
  assert "conv_general_dilated" in strided                # stride 2: not a Winograd layer


# Padding above 2 on a side: d_input cannot be the padded forward Winograd convolution and
# takes the transposed input transform instead.
_WIDE_PAD = ("3x3_s1_pad3", (2, 5, 6, 4), (3, 3, 4, 4), (1, 1), ((3, 1), (0, 3)))


@pytest.mark.parametrize("tile", [2, 4])
@pytest.mark.parametrize("name,x_shape,k_shape,strides,padding",
                         [_CASES[1], _CASES[7], _CASES[8], _CASES[9], _WIDE_PAD],
                         ids=[_IDS[1], _IDS[7], _IDS[8], _IDS[9], _WIDE_PAD[0]])
def test_winograd_tiles_match_lax(name, x_shape, k_shape, strides, padding, tile, monkeypatch):
  """Both output tiles, F(2x2, 3x3) and F(4x4, 3x3), values and gradients under jit. F(4x4)'s
  transform coefficients (up to 8 and 1/24) cost float32 digits, hence its looser bound."""
  del name
  monkeypatch.setattr(fast_conv, "_winograd_tile", lambda output_hw, dtype: tile)
  x, w, kd = _inputs(x_shape, k_shape, jnp.float32)
  dy = jax.random.normal(kd, _ref_conv(x, w, strides, padding).shape)
  y_r, dx_r, dw_r = _value_and_grads(lambda a, b: _ref_conv(a, b, strides, padding), x, w, dy)
  y, dx, dw = jax.jit(lambda a, b: _value_and_grads(
      lambda x_, w_: fast_conv.conv2d(x_, w_, strides, padding, "winograd"), a, b, dy))(x, w)
  tol = 1e-5 if tile == 2 else 1e-4
  _assert_close(y, y_r, tol, tol)
  _assert_close(dx, dx_r, tol, tol)
  _assert_close(dw, dw_r, tol, 10 * tol)


def _entry_fusions(fn, *args):
  """How many fusions the compiled entry computation of `fn` runs."""
  text = jax.jit(fn).lower(*args).compile().as_text()
  return text[text.index("\nENTRY"):].count(" fusion(")


@pytest.mark.parametrize("tile", [2, 4])
def test_winograd_transforms_compute_each_row_once(tile):
  """The input transform V = Bᵀ d B and the backward's dM = A dY Aᵀ run their two 1-D passes
  on whole stacked arrays. Written per row, XLA compiled one fusion per entry of the transform
  ((m+2)² of them, 37 and 36 for F(4x4)), each recomputing its row from the input: at 56 px x
  64 channels, batch 32, 11-18 ms against 8.5-10 ms for V (the Zen 5 notes:
  `git show 7e10829:experiments/README.md`)."""
  x = jax.ShapeDtypeStruct((2, 8, 8, 4), jnp.float32)
  pad = ((1, 1), (1, 1))
  assert _entry_fusions(lambda a: fast_conv._winograd_input_transform(a, pad, tile), x) <= 3
  assert _entry_fusions(
      lambda a: fast_conv._winograd_output_transform_t(a, x.shape, pad, tile), x) <= 2


@pytest.mark.parametrize("vendor", ["AuthenticAMD", "GenuineIntel"])
def test_auto_resolves_by_backend(vendor, monkeypatch):
  monkeypatch.setattr(fast_conv, "_cpu_vendor", lambda: vendor)
  on_cpu = jax.default_backend() == "cpu"
  intel = vendor == "GenuineIntel"
  assert fast_conv.resolve_impl("auto") == ("im2col" if on_cpu else "xla")
  assert fast_conv.resolve_impl("xla") == "xla"
  assert fast_conv.resolve_impl("im2col") == "im2col"
  assert fast_conv.resolve_impl("patches") == "patches"
  assert fast_conv.resolve_impl("winograd") == "winograd"
  # Per layer shape on CPU (7 x 7 output pixels): 1x1 kernels take the matmul backward, larger
  # kernels keep XLA's on AMD and take the matmul d_kernel too on Intel.
  kxk = "im2col" if intel else "xla"
  per_shape = {
      ((1, 1, 256, 512), (2, 2)): "im2col",
      ((1, 1, 64, 256), (1, 1)): "im2col",
      ((3, 3, 64, 64), (1, 1)): kxk,
      ((7, 7, 3, 64), (2, 2)): kxk,
      ((3, 3, 64, 128), (2, 2)): kxk,
      ((3, 3, 512, 512), (1, 1)): kxk,
  }
  for (k_shape, strides), want in per_shape.items():
    got = fast_conv.resolve_impl("auto", k_shape, strides, output_pixels=49)
    assert got == (want if on_cpu else "xla"), (k_shape, strides)
  # Below 7 x 7 output pixels (the local net's 4 x 4 layers) Intel keeps XLA's too.
  got = fast_conv.resolve_impl("auto", (3, 3, 128, 128), (1, 1), output_pixels=16)
  assert got == "xla"
  # A few output pixels (the local net on 32 px crops): k x k kernels take the patch matmul.
  per_output = {((3, 3, 256, 512), 1): "patches", ((3, 3, 256, 256), 4): "patches",
                ((3, 3, 128, 128), 16): "xla", ((1, 1, 512, 2048), 1): "im2col"}
  for (k_shape, pixels), want in per_output.items():
    got = fast_conv.resolve_impl("auto", k_shape, (1, 1), output_pixels=pixels)
    assert got == (want if on_cpu else "xla"), (k_shape, pixels)
  # Stride-1 3x3 layers from 14 x 14 output pixels on: Winograd.
  per_winograd = {((3, 3, 64, 64), (1, 1), 56 * 56): "winograd",
                  ((3, 3, 256, 256), (1, 1), 14 * 14): "winograd",
                  ((3, 3, 512, 512), (1, 1), 7 * 7): kxk,
                  ((3, 3, 64, 128), (2, 2), 28 * 28): kxk}
  for (k_shape, strides, pixels), want in per_winograd.items():
    got = fast_conv.resolve_impl("auto", k_shape, strides, output_pixels=pixels)
    assert got == (want if on_cpu else "xla"), (k_shape, strides, pixels)
  # F(4x4, 3x3) only in float32 and from 28 px a side; bfloat16 keeps the additions-only F(2x2).
  tile = fast_conv._winograd_tile  # pylint: disable=protected-access
  assert tile((56, 56), jnp.float32) == 4 and tile((28, 28), jnp.float32) == 4
  assert tile((14, 14), jnp.float32) == 2 and tile((56, 56), jnp.bfloat16) == 2
  with pytest.raises(ValueError):
    fast_conv.resolve_impl("cudnn")
  with pytest.raises(ValueError):
    fast_conv.conv2d(jnp.ones((1, 4, 4, 1)), jnp.ones((1, 1, 1, 1)),
                     padding=((-1, 0), (0, 0)))


def test_copied_input_rule():
  """Which layers' k x k d_kernel (XLA's under 'auto', and im2col's) reads a copy of x on CPU:
  16-128 input channels, a multiple of 8 (not the 3-channel stems, not the 256-512-channel
  layers)."""
  rule = fast_conv._cpu_copies_kernel_grad_input  # pylint: disable=protected-access
  assert rule((3, 3, 64, 128)) and rule((3, 3, 128, 128)) and rule((3, 3, 16, 8))
  assert not rule((3, 3, 256, 256)) and not rule((3, 3, 512, 512))
  assert not rule((7, 7, 3, 64)) and not rule((3, 3, 8, 8)) and not rule((3, 3, 20, 16))
  assert not rule((1, 1, 64, 64))


def test_auto_matches_reference_with_lists():
  """Strides/padding given as lists (as configs deliver them) also work."""
  x, w, _ = _inputs((2, 8, 8, 3), (3, 3, 3, 4), jnp.float32)
  y = fast_conv.conv2d(x, w, [2, 2], [[1, 1], [1, 1]])
  _assert_close(y, _ref_conv(x, w, (2, 2), ((1, 1), (1, 1))), 1e-5, 1e-5)


def test_matmul_copy_is_exact():
  """The copy of x that the k x k d_kernels read on CPU equals x, float32 and bfloat16."""
  magnitudes = jnp.logspace(-30, 30, 16).reshape(1, 1, 1, 16)
  x = jax.random.normal(jax.random.PRNGKey(0), (2, 5, 5, 16)) * magnitudes
  x = x.at[0, 0, 0].set(0.0)
  for dtype in (jnp.float32, jnp.bfloat16):
    xd = x.astype(dtype)
    copy = jax.jit(fast_conv._matmul_copy)(xd)  # pylint: disable=protected-access
    assert copy.dtype == dtype
    np.testing.assert_array_equal(np.asarray(copy, np.float32), np.asarray(xd, np.float32))


# Two layers of ρ(x) at tiny size: a stride-2 3x3 on 64 channels (the layer whose input
# relayout XLA recomputed) and a stride-1 3x3 on 16 channels at 2x2 outputs.
_COPIED_CASES = [("3x3_s2_c64", (2, 8, 8, 64), (3, 3, 64, 32), (2, 2), ((1, 1), (1, 1))),
                 ("3x3_s1_c16", (2, 2, 2, 16), (3, 3, 16, 8), (1, 1), ((1, 1), (1, 1)))]


@pytest.mark.parametrize("name,x_shape,k_shape,strides,padding", _COPIED_CASES,
                         ids=[c[0] for c in _COPIED_CASES])
def test_xla_conv_with_copied_input_equals_xla(name, x_shape, k_shape, strides, padding):
  """Values and both gradients equal XLA's own, bit for bit, under jit and under vmap."""
  del name
  x, w, kd = _inputs(x_shape, k_shape, jnp.float32)
  dy = jax.random.normal(kd, _ref_conv(x, w, strides, padding).shape)
  # pylint: disable=protected-access
  copied = lambda a, b: fast_conv._xla_conv_copied_input(a, b, strides, padding)
  plain = lambda a, b: fast_conv._xla_conv(a, b, strides, padding)
  # pylint: enable=protected-access
  got = jax.jit(lambda a, b: _value_and_grads(copied, a, b, dy))(x, w)
  want = jax.jit(lambda a, b: _value_and_grads(plain, a, b, dy))(x, w)
  for g, r in zip(got, want):
    np.testing.assert_array_equal(np.asarray(g), np.asarray(r))
  per_example = lambda conv: jax.jit(jax.vmap(jax.grad(
      lambda a, b: jnp.sum(jnp.tanh(conv(a[None], b))), argnums=(0, 1)), in_axes=(0, None)))
  for g, r in zip(per_example(copied)(x, w), per_example(plain)(x, w)):
    np.testing.assert_array_equal(np.asarray(g), np.asarray(r))
  y_ref, dx_ref, dw_ref = _value_and_grads(lambda a, b: _ref_conv(a, b, strides, padding),
                                           x, w, dy)
  _assert_close(got[0], y_ref, 1e-5, 1e-5)
  _assert_close(got[1], dx_ref, 1e-5, 1e-5)
  _assert_close(got[2], dw_ref, 1e-5, 1e-4)


def _fused_bodies(hlo_text):
  """{computation name: body text} of a compiled HLO module."""
  return dict(re.findall(r"\n(%[\w.-]+) [^\n]*\{\n(.*?)\n\}", hlo_text, re.S))


def _kernel_grad_input_ops(hlo_text, kernel_grad_shape):
  """Ops that compute the input operand of the convolution whose result has
  `kernel_grad_shape` (XLA's d_kernel), when that operand is a fusion; else []."""
  fused_bodies = _fused_bodies(hlo_text)
  conv = re.search(r"(%[\w.-]+) = " + re.escape(kernel_grad_shape) + r"\S* fusion\((%[\w.-]+)",
                   hlo_text)
  assert conv, f"no fusion computing {kernel_grad_shape}"
  producer = re.search(re.escape(conv.group(2)) + r" = [^\n]*? fusion\([^\n]*?calls=(%[\w.-]+)",
                       hlo_text)
  if producer is None:
    return []
  return re.findall(r"= \S+ ([a-z-]+)\(", fused_bodies[producer.group(1)])


def test_auto_keeps_the_inputs_producer_out_of_xlas_kernel_gradient(monkeypatch):
  """'auto' on CPU: XLA's k x k d_kernel reads x relaid out, and that relayout must not
  recompute x's producer (here ReLU(x·a + b), as BatchNorm and ReLU in a ResNet)."""
  if jax.default_backend() != "cpu":
    pytest.skip("'auto' is XLA's plain convolution off CPU")
  monkeypatch.setattr(fast_conv, "_cpu_vendor", lambda: "AuthenticAMD")
  x, w, _ = _inputs((2, 8, 8, 64), (3, 3, 64, 32), jnp.float32)
  pad = ((1, 1), (1, 1))

  def loss(impl):
    def f(a, b):
      h = jax.nn.relu(a * 1.5 + 0.25)
      return jnp.sum(jnp.tanh(fast_conv.conv2d(h, b, (2, 2), pad, impl=impl)))
    return f

  assert fast_conv.resolve_impl("auto", w.shape, (2, 2), 16) == "xla"
  ops = {impl: _kernel_grad_input_ops(
      jax.jit(jax.grad(loss(impl), argnums=(0, 1))).lower(x, w).compile().as_text(),
      "f32[64,3,3,32]") for impl in ("auto", "xla")}
  elementwise = {"maximum", "multiply", "add", "select"}
  # Plain XLA recomputes the producer inside the relayout: the premise of the copy.
  assert elementwise & set(ops["xla"]), ops["xla"]
  assert not elementwise & set(ops["auto"]), ops["auto"]


def _ops_feeding(hlo_text, consumer_op):
  """Ops computed, in fusions of the entry computation, upstream of its `consumer_op`
  instruction (e.g. 'while'), following operands back through everything but dots and
  convolutions (XLA cannot fuse a producer into those, so the search stops there)."""
  entry = hlo_text[hlo_text.index("\nENTRY"):]
  instructions = {}
  for name, op, operands, rest in re.findall(
      r"\n\s*(?:ROOT )?(%[\w.-]+) = .*? ([a-z-]+)\(([^)]*)\)(.*)", entry):
    calls = re.search(r"calls=(%[\w.-]+)", rest)
    instructions[name] = (op, re.findall(r"%[\w.-]+", operands), calls and calls.group(1),
                          "kind=kCustom" in rest)
  bodies = _fused_bodies(hlo_text)
  start = [name for name, (op, _, _, _) in instructions.items() if op == consumer_op]
  assert len(start) == 1, f"expected one {consumer_op} in the entry computation, got {start}"
  ops, seen, stack = set(), set(), list(instructions[start[0]][1])
  while stack:
    name = stack.pop()
    if name in seen or name not in instructions:
      continue
    seen.add(name)
    op, operands, calls, custom = instructions[name]
    if op in ("dot", "convolution") or custom:
      continue
    if op == "fusion":
      ops.update(re.findall(r"= \S+ ([a-z-]+)\(", bodies[calls]))
    stack.extend(operands)
  return ops


def test_im2col_keeps_the_inputs_producer_out_of_its_kernel_gradient(monkeypatch):
  """The im2col d_kernel on CPU transposes x to [Ci, B, H, W] for its loop over kernel rows,
  and that transpose must not recompute x's producer (ReLU(x·a + b), as BatchNorm and ReLU in
  a ResNet)."""
  if jax.default_backend() != "cpu":
    pytest.skip("the copy is made on CPU only")
  x, w, _ = _inputs((2, 8, 8, 64), (3, 3, 64, 32), jnp.float32)

  def f(a, b):
    h = jax.nn.relu(a * 1.5 + 0.25)
    return jnp.sum(jnp.tanh(fast_conv.conv2d(h, b, (2, 2), ((1, 1), (1, 1)), impl="im2col")))

  def ops_feeding_kernel_grad():
    text = jax.jit(jax.grad(f, argnums=(0, 1))).lower(x, w).compile().as_text()
    return _ops_feeding(text, "while")

  # The ReLU is the one `maximum` in the step: dy's path (tanh') has none.
  assert "maximum" not in ops_feeding_kernel_grad()
  # Without the copy XLA recomputes the producer inside the transpose: the premise.
  monkeypatch.setattr(fast_conv, "_cpu_copies_kernel_grad_input", lambda kernel_shape: False)
  assert "maximum" in ops_feeding_kernel_grad()


def test_conv_flops():
  assert fast_conv.conv_flops((32, 56, 56, 64), (3, 3, 64, 64), (1, 1),
                              ((1, 1), (1, 1))) == 2 * 32 * 56 * 56 * 9 * 64 * 64
  assert fast_conv.conv_flops((1, 224, 224, 3), (7, 7, 3, 64), (2, 2),
                              ((3, 3), (3, 3))) == 2 * 112 * 112 * 49 * 3 * 64


def _flax_max_pool(x, window, strides, padding):
  import flax.linen as nn  # pylint: disable=g-import-not-at-top
  return nn.max_pool(x, window, strides=strides, padding=padding)


@pytest.mark.parametrize("x_shape,window,strides,padding", [
    ((2, 8, 8, 3), (3, 3), (2, 2), ((1, 1), (1, 1))),  # the ResNet stem
    ((2, 7, 9, 2), (3, 3), (2, 2), ((1, 1), (1, 1))),  # odd sizes
    ((1, 6, 6, 2), (2, 3), (1, 2), ((0, 1), (2, 0))),  # rectangular, asymmetric
])
@pytest.mark.parametrize("ties", [False, True])
def test_max_pool_matches_flax(x_shape, window, strides, padding, ties):
  x = jax.random.normal(jax.random.PRNGKey(0), x_shape)
  if ties:  # post-ReLU zeros and repeated values: the gradient must pick the same element
    x = jnp.round(jax.nn.relu(x) * 2) / 2
  dy = jax.random.normal(jax.random.PRNGKey(1), _flax_max_pool(x, window, strides,
                                                               padding).shape)
  ours = lambda a: fast_conv.max_pool(a, window, strides, padding, impl="im2col")
  y, vjp = jax.vjp(jax.jit(ours), x)
  y_r, vjp_r = jax.vjp(lambda a: _flax_max_pool(a, window, strides, padding), x)
  np.testing.assert_array_equal(y, y_r)
  # Equal up to the order in which overlapping windows' shares are summed.
  np.testing.assert_allclose(vjp(dy)[0], vjp_r(dy)[0], rtol=1e-6, atol=1e-6)
  # vmap over an extra batch axis, and bfloat16.
  xs = jnp.stack([x, -x])
  np.testing.assert_array_equal(jax.vmap(ours)(xs),
                                jax.vmap(lambda a: _flax_max_pool(a, window, strides,
                                                                  padding))(xs))
  xb = x.astype(jnp.bfloat16)
  g = jax.grad(lambda a: jnp.sum(ours(a).astype(jnp.float32) * dy))(xb)
  g_r = jax.grad(lambda a: jnp.sum(_flax_max_pool(a, window, strides, padding)
                                   .astype(jnp.float32) * dy))(xb)
  assert g.dtype == jnp.bfloat16
  _assert_close(g, g_r, 1e-2, 1e-2)
  assert fast_conv.resolve_impl("auto") != "xla" or jax.default_backend() != "cpu"


def _compiled_with_options(fn, *args):
  options = fast_conv.compiler_options()
  if options is None:
    pytest.skip("this backend or jaxlib has no CPU library-fusion option")
  return jax.jit(fn, compiler_options=options).lower(*args).compile()


@pytest.mark.parametrize("name,x_shape,k_shape,strides,padding", _CASES, ids=_IDS)
def test_compiler_options_keep_values_and_gradients(name, x_shape, k_shape, strides, padding):
  """Compiled with `compiler_options()` (XLA's convolutions by Eigen's CPU kernels), values
  and gradients equal the reference compiled with jax's defaults (YNNPACK's)."""
  del name
  x, w, kd = _inputs(x_shape, k_shape, jnp.float32)
  y_ref = _ref_conv(x, w, strides, padding)
  dy = jax.random.normal(kd, y_ref.shape)
  fn = _compiled_with_options(lambda a, b: _value_and_grads(
      lambda x_, w_: fast_conv.conv2d(x_, w_, strides, padding, impl="xla"), a, b, dy), x, w)
  y, dx, dw = fn(x, w)
  y_r, dx_r, dw_r = jax.jit(lambda a, b: _value_and_grads(
      lambda x_, w_: _ref_conv(x_, w_, strides, padding), a, b, dy))(x, w)
  _assert_close(y, y_r, 1e-5, 1e-5)
  _assert_close(dx, dx_r, 1e-5, 1e-5)
  _assert_close(dw, dw_r, 1e-5, 1e-4)


def _library_fusions(compiled, op_name):
  """Lines of the compiled HLO that call a YNNPACK fusion made from `op_name` ops."""
  return [line for line in compiled.as_text().splitlines()
          if "ynn_fusion" in line and " fusion(" in line and f"/{op_name}" in line]


def test_compiler_options_take_convolutions_off_ynnpack_only():
  """Under `compiler_options()` no convolution, forward or gradient, is a YNNPACK fusion while
  the dots still are; under jax's defaults the convolutions are (the control: jax 0.10 hands
  this 64-channel layer's forward and d_input to YNNPACK)."""
  x, w, kd = _inputs((2, 8, 8, 64), (3, 3, 64, 64), jnp.float32)
  m = jax.random.normal(kd, (64, 64))

  def loss(x_, w_, m_):
    y = fast_conv.conv2d(x_, w_, (1, 1), ((1, 1), (1, 1)), impl="xla")
    return jnp.sum(jnp.tanh(y.reshape(-1, 64) @ m_))

  grads = lambda *a: jax.grad(loss, argnums=(0, 1, 2))(*a)
  with_options = _compiled_with_options(grads, x, w, m)
  default = jax.jit(grads).lower(x, w, m).compile()
  assert _library_fusions(default, "conv_general_dilated")
  assert not _library_fusions(with_options, "conv_general_dilated")
  assert "convolution(" in with_options.as_text()
  assert _library_fusions(with_options, "dot_general")


def test_package_jits_compile_with_the_compiler_options(monkeypatch):
  """The training step and evaluation's sampler are compiled with `compiler_options()`; the
  public sampler factory only when asked, so that it stays callable inside a user's jit."""
  from diffmic_jax.evaluation import evaluate  # pylint: disable=import-outside-toplevel
  from diffmic_jax.diffusion import sampler  # pylint: disable=import-outside-toplevel
  from diffmic_jax.platform import sharding  # pylint: disable=import-outside-toplevel
  from diffmic_jax.training import train  # pylint: disable=import-outside-toplevel
  seen = []
  real_jit = jax.jit

  def recording_jit(fn, **kwargs):
    seen.append(kwargs.get("compiler_options"))
    return real_jit(fn, **kwargs)

  monkeypatch.setattr(jax, "jit", recording_jit)
  train.jit_step(lambda state, batch: (state, {}), sharding.make_mesh())
  models = type("Models", (), {"num_timesteps": 1000})()
  evaluate._sample_fn.__wrapped__(models, "respaced", 10, 1)  # pylint: disable=protected-access
  sampler.make_sample_fn(models, "respaced", 10)
  assert seen == [fast_conv.compiler_options()] * 2 + [None]
  assert seen[0] is not None or jax.default_backend() != "cpu"


def test_compiler_options_leave_a_users_xla_flags_setting_alone(monkeypatch):
  """Where XLA_FLAGS sets the library-fusion option, `compiler_options()` does not override it."""
  if fast_conv.compiler_options() is None:
    pytest.skip("this backend or jaxlib has no CPU library-fusion option")
  monkeypatch.setenv("XLA_FLAGS", "--xla_force_host_platform_device_count=1 "
                     "--xla_cpu_experimental_ynn_fusion_type=+individual_convolution")
  assert fast_conv.compiler_options() is None
  monkeypatch.setenv("XLA_FLAGS", "--xla_force_host_platform_device_count=1")
  assert fast_conv.compiler_options() is not None
