"""ResNet trunks (NHWC) laid out like torchvision, so ImageNet weights map one to one.

Parameter paths mirror torchvision's state_dict names: `conv1`, `bn1`, `layer{s}_{b}` with
`conv{i}`/`bn{i}` inside and `downsample_conv`/`downsample_bn` for `downsample.0`/`.1`.
Width and depth are constructor arguments so tests can build tiny trunks.
"""

from typing import Any, Sequence

import flax.linen as nn
import jax.numpy as jnp

from diffmic_jax.nn import fast_conv
from diffmic_jax.nn import layers

# name -> (stage sizes, block kind); block kinds: 'basic' (expansion 1), 'bottleneck' (4).
ARCHITECTURES = {
    "resnet18": ((2, 2, 2, 2), "basic"),
    "resnet34": ((3, 4, 6, 3), "basic"),
    "resnet50": ((3, 4, 6, 3), "bottleneck"),
}
EXPANSION = {"basic": 1, "bottleneck": 4}


class _Block(nn.Module):
  """BasicBlock (two 3×3 convs) or Bottleneck (1×1, 3×3, 1×1; stride on the 3×3, as torchvision)."""

  kind: str
  features: int
  strides: int
  downsample: bool
  dtype: Any
  bn_kwargs: Any
  conv_impl: str

  def _conv(self, features, kernel, strides, padding, name):
    return layers.Conv(features, (kernel, kernel), (strides, strides), padding,
                       dtype=self.dtype, impl=self.conv_impl, name=name)

  def _bn(self, name):
    return layers.BatchNorm(dtype=self.dtype, name=name, **dict(self.bn_kwargs))

  @nn.compact
  def __call__(self, x, train: bool):
    if self.kind == "basic":
      convs = [(self.features, 3, self.strides, 1), (self.features, 3, 1, 1)]
    else:
      convs = [(self.features, 1, 1, 0), (self.features, 3, self.strides, 1),
               (self.features * 4, 1, 1, 0)]
    y = x
    for i, (features, kernel, strides, padding) in enumerate(convs, start=1):
      y = self._conv(features, kernel, strides, padding, f"conv{i}")(y)
      y = self._bn(f"bn{i}")(y, train)
      if i < len(convs):
        y = nn.relu(y)
    if self.downsample:
      out_features = self.features * EXPANSION[self.kind]
      x = self._conv(out_features, 1, self.strides, 0, "downsample_conv")(x)
      x = self._bn("downsample_bn")(x, train)
    return nn.relu(y + x)


class ResNet(nn.Module):
  """torchvision ResNet without `avgpool`/`fc`.

  Attributes:
    stage_sizes: blocks per stage (torchvision ResNet-18: (2, 2, 2, 2)); stage 1 has stride
      1, every later stage stride 2, so the trunk downsamples by 2**(len(stage_sizes) + 1).
    block: 'basic' or 'bottleneck'.
    width: channels of the stem and of stage 1 (64 in torchvision).
    bn_momentum: Flax-convention BatchNorm momentum (PyTorch 0.1 -> 0.9).
    unbiased_running_var: PyTorch's running-variance convention.
    conv_impl: see `fast_conv.conv2d`.
  """

  stage_sizes: Sequence[int]
  block: str = "basic"
  width: int = 64
  dtype: Any = jnp.float32
  bn_momentum: float = 0.9
  unbiased_running_var: bool = True
  conv_impl: str = "auto"

  @nn.compact
  def __call__(self, x, train: bool):
    """Runs the trunk.

    Args:
      x: [B, H, W, 3] images.
      train: BatchNorm uses batch statistics (and updates running ones) when True.

    Returns:
      pooled [B, F] global-average-pooled features, and {'feature_map': [B, h, w, F]}.
    """
    if self.block not in EXPANSION:
      raise ValueError(f"unknown ResNet block {self.block!r}; choose from {sorted(EXPANSION)}")
    bn_kwargs = (("momentum", self.bn_momentum),
                 ("unbiased_running_var", self.unbiased_running_var))
    x = layers.Conv(self.width, (7, 7), (2, 2), 3, dtype=self.dtype, impl=self.conv_impl,
                    name="conv1")(x)
    x = layers.BatchNorm(dtype=self.dtype, name="bn1", **dict(bn_kwargs))(x, train)
    x = nn.relu(x)
    # torch MaxPool2d(3, 2, padding=1) pads with -inf.
    x = fast_conv.max_pool(x, (3, 3), (2, 2), ((1, 1), (1, 1)), impl=self.conv_impl)
    in_features = self.width
    for stage, num_blocks in enumerate(self.stage_sizes):
      features = self.width * 2**stage
      for b in range(num_blocks):
        strides = 2 if (stage > 0 and b == 0) else 1
        out_features = features * EXPANSION[self.block]
        x = _Block(self.block, features, strides,
                   downsample=(b == 0 and (strides != 1 or in_features != out_features)),
                   dtype=self.dtype, bn_kwargs=bn_kwargs, conv_impl=self.conv_impl,
                   name=f"layer{stage + 1}_{b}")(x, train)
        in_features = out_features
    return jnp.mean(x.astype(jnp.float32), axis=(1, 2)), {"feature_map": x}


def resnet_kwargs(name: str, stage_sizes: Sequence[int] = ()) -> dict:
  """Constructor arguments for a named torchvision architecture (optionally shallower)."""
  if name not in ARCHITECTURES:
    raise ValueError(f"unknown backbone {name!r}; choose from {sorted(ARCHITECTURES)}")
  default_stages, block = ARCHITECTURES[name]
  return {"stage_sizes": tuple(stage_sizes) or default_stages, "block": block}
