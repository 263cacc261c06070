"""Layers shared by the networks: PyTorch-parity initialisers, BatchNorm and Conv.

The official code is PyTorch, so the defaults here reproduce PyTorch's behaviour where it
differs from Flax's: Linear init U(±1/√fan_in), torchvision's kaiming-normal(fan_out) conv init,
and BatchNorm running variance stored unbiased (REFERENCE.md §6).
"""

from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from diffmic_jax.nn import fast_conv

Dtype = Any

# torchvision ResNet conv init: kaiming_normal_(mode='fan_out', nonlinearity='relu').
conv_kernel_init = nn.initializers.variance_scaling(2.0, "fan_out", "normal")


def torch_linear_kernel_init(key, shape, dtype=jnp.float32):
  """PyTorch nn.Linear weight init U(±1/√fan_in) for a Flax [in, out] kernel."""
  bound = 1.0 / jnp.sqrt(shape[0])
  return jax.random.uniform(key, shape, dtype, -bound, bound)


def torch_linear_bias_init(fan_in: int):
  """PyTorch nn.Linear bias init U(±1/√fan_in)."""

  def init(key, shape, dtype=jnp.float32):
    bound = 1.0 / jnp.sqrt(fan_in)
    return jax.random.uniform(key, shape, dtype, -bound, bound)

  return init


class TorchDense(nn.Module):
  """nn.Dense with PyTorch's default initialisation (weight and bias U(±1/√fan_in))."""

  features: int
  use_bias: bool = True
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    fan_in = x.shape[-1]
    return nn.Dense(
        self.features,
        use_bias=self.use_bias,
        dtype=self.dtype,
        kernel_init=torch_linear_kernel_init,
        bias_init=torch_linear_bias_init(fan_in),
        name="dense",
    )(x)


def batch_moments(x, axes):
  """Mean and biased variance of x [..., F] over `axes` (the batch axis 0 and any others but the
  last), [F] each, in one pass over x.

  The variance is taken about a shift c [F], the mean of the first example:
  Var = E[(x − c)²] − (E[x − c])², with c out of the gradient (Var does not depend on c). The
  plain one-pass E[x²] − E[x]² loses digits when |mean| ≫ std (relative error about
  ε·mean²/Var: 5e-3 at mean/std = 100 in float32); c lies within the batch, so
  (E[x] − c)² ≤ B·Var for B examples and the error stays below about ε·(B + 1) whatever the
  data. The two-pass form (mean, then E[(x − mean)²]) reads x once more, forward and backward:
  BatchNorm + ReLU forward and backward took 21-31 % longer with it, and the paper DCG warm-up
  step 0.15-0.3 s of about 4.2 s in one whole-step A/B (none resolved in a noisier one;
  experiments/speed/README.md, "AMD Zen 5").
  """
  if axes[0] != 0:
    raise ValueError(f"axes must start with the batch axis 0, got {axes}")
  shift = jax.lax.stop_gradient(jnp.mean(x[0], tuple(a - 1 for a in axes[1:])))
  centred = x - shift.reshape((1,) * (x.ndim - 1) + shift.shape)
  shifted_mean = jnp.mean(centred, axes)
  var = jnp.maximum(jnp.mean(jnp.square(centred), axes) - jnp.square(shifted_mean), 0.0)
  return shifted_mean + shift, var


class BatchNorm(nn.Module):
  """BatchNorm over all axes but the last, with PyTorch's running-statistics convention.

  Attributes:
    momentum: Flax convention, running = momentum * running + (1 - momentum) * batch
      (PyTorch momentum 0.1 is 0.9 here).
    unbiased_running_var: store the unbiased batch variance n/(n-1)·var in the running
      variance, as PyTorch does; normalisation always uses the biased variance.
  """

  momentum: float = 0.9
  epsilon: float = 1e-5
  unbiased_running_var: bool = True
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x, train: bool):
    features = x.shape[-1]
    scale = self.param("scale", nn.initializers.ones, (features,), jnp.float32)
    bias = self.param("bias", nn.initializers.zeros, (features,), jnp.float32)
    ra_mean = self.variable("batch_stats", "mean", jnp.zeros, (features,), jnp.float32)
    ra_var = self.variable("batch_stats", "var", jnp.ones, (features,), jnp.float32)
    if train:
      axes = tuple(range(x.ndim - 1))
      x32 = x.astype(jnp.float32)
      mean, var = batch_moments(x32, axes)
      if not self.is_initializing():
        count = x.size // features
        stored_var = var * (count / max(count - 1, 1)) if self.unbiased_running_var else var
        ra_mean.value = self.momentum * ra_mean.value + (1 - self.momentum) * mean
        ra_var.value = self.momentum * ra_var.value + (1 - self.momentum) * stored_var
    else:
      mean, var = ra_mean.value, ra_var.value
    mul = scale * jax.lax.rsqrt(var + self.epsilon)
    shape = (1,) * (x.ndim - 1) + (features,)
    shift = (bias - mean * mul).astype(self.dtype).reshape(shape)
    return (x * mul.astype(self.dtype).reshape(shape) + shift).astype(self.dtype)


class Conv(nn.Module):
  """Bias-free NHWC convolution with torchvision's init and explicit (PyTorch) padding.

  `impl` picks how the convolution and its gradients are computed (see `fast_conv`): XLA's
  convolution, or a formulation whose weight-gradient runs on the CPU's fast matmul path.
  """

  features: int
  kernel_size: Sequence[int]
  strides: Sequence[int] = (1, 1)
  padding: int = 0
  dtype: Dtype = jnp.float32
  impl: str = "auto"

  @nn.compact
  def __call__(self, x):
    kh, kw = self.kernel_size
    kernel = self.param("kernel", conv_kernel_init, (kh, kw, x.shape[-1], self.features),
                        jnp.float32)
    pad = ((self.padding, self.padding), (self.padding, self.padding))
    return fast_conv.conv2d(x.astype(self.dtype), kernel.astype(self.dtype),
                            strides=tuple(self.strides), padding=pad, impl=self.impl)
