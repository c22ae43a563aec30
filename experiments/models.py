"""Flax models for the SparseOpt experiments.

Every convolution is followed by BatchNorm, as in the paper's networks: that
BatchNorm is what turns uneven per-neuron sparsity into gradient skew. The
final classifier is always a `nn.Dense` named ``head`` so that configs can
address it by path (for example ``sparseopt.exclude_paths("head")``).

Presets:
  * CIFAR ResNets (``ResNet20``/``32``/``56``): 3 stages of 16/32/64 filters,
    ``n`` basic blocks each (depth ``6n + 2``), projection shortcuts
    (1x1 conv + BN) where the shape changes.
  * ImageNet ResNets (``ResNet18``/``ResNet50``): the torchvision layout.
  * ``FmnistResNet``: a CIFAR ResNet with one block per stage (ResNet-8) and
    8/16/32 filters, small enough to train on two CPU cores in minutes.
  * ``FmnistMLP``: the paper's 2-layer BatchNorm MLP.
"""

import functools
from typing import Any
from collections.abc import Callable, Sequence

import flax.linen as nn
import jax.numpy as jnp

ModuleDef = Any

# Kaiming-normal over fan-out, the torchvision ResNet initialisation the
# paper's PyTorch code inherits.
_conv_init = nn.initializers.variance_scaling(2.0, "fan_out", "normal")


class BasicBlock(nn.Module):
  """Two 3x3 convolutions with BN; projection shortcut when shape changes."""

  filters: int
  conv: ModuleDef
  norm: ModuleDef
  strides: int = 1

  @nn.compact
  def __call__(self, x):
    residual = x
    y = self.conv(self.filters, (3, 3), (self.strides, self.strides))(x)
    y = nn.relu(self.norm()(y))
    y = self.conv(self.filters, (3, 3))(y)
    y = self.norm()(y)
    if residual.shape != y.shape:
      residual = self.conv(
          self.filters, (1, 1), (self.strides, self.strides), name="conv_proj"
      )(residual)
      residual = self.norm(name="norm_proj")(residual)
    return nn.relu(residual + y)


class BottleneckBlock(nn.Module):
  """1x1 -> 3x3 -> 1x1 bottleneck with 4x expansion (ResNet-50 and up)."""

  filters: int
  conv: ModuleDef
  norm: ModuleDef
  strides: int = 1

  @nn.compact
  def __call__(self, x):
    residual = x
    y = nn.relu(self.norm()(self.conv(self.filters, (1, 1))(x)))
    y = self.conv(self.filters, (3, 3), (self.strides, self.strides))(y)
    y = nn.relu(self.norm()(y))
    y = self.conv(self.filters * 4, (1, 1))(y)
    y = self.norm()(y)
    if residual.shape != y.shape:
      residual = self.conv(
          self.filters * 4,
          (1, 1),
          (self.strides, self.strides),
          name="conv_proj",
      )(residual)
      residual = self.norm(name="norm_proj")(residual)
    return nn.relu(residual + y)


def _conv_and_norm(train: bool, dtype: Any):
  conv = functools.partial(
      nn.Conv, use_bias=False, dtype=dtype, kernel_init=_conv_init
  )
  # momentum 0.9 / eps 1e-5 match PyTorch's BatchNorm2d defaults.
  norm = functools.partial(
      nn.BatchNorm,
      use_running_average=not train,
      momentum=0.9,
      epsilon=1e-5,
      dtype=dtype,
  )
  return conv, norm


class CifarResNet(nn.Module):
  """ResNet for small images (He et al. 2016, section 4.2).

  Attributes:
    stage_sizes: number of blocks in each stage.
    num_classes: classifier outputs.
    num_filters: filters of the first stage; doubled at every later stage.
    dtype: computation dtype (parameters stay float32).
  """

  stage_sizes: Sequence[int]
  num_classes: int
  num_filters: int = 16
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, train: bool = True):
    conv, norm = _conv_and_norm(train, self.dtype)
    x = conv(self.num_filters, (3, 3), name="conv_init")(x)
    x = nn.relu(norm(name="bn_init")(x))
    for i, num_blocks in enumerate(self.stage_sizes):
      for j in range(num_blocks):
        x = BasicBlock(
            self.num_filters * 2**i,
            conv=conv,
            norm=norm,
            strides=2 if i > 0 and j == 0 else 1,
        )(x)
    x = jnp.mean(x, axis=(1, 2))
    return nn.Dense(self.num_classes, dtype=self.dtype, name="head")(x)


class ResNet(nn.Module):
  """ImageNet ResNet (7x7 stem, max-pool, 4 stages of 64..512 filters).

  Attributes:
    stage_sizes: number of blocks in each stage.
    block_cls: `BasicBlock` (ResNet-18/34) or `BottleneckBlock` (50 and up).
    num_classes: classifier outputs.
    num_filters: filters of the first stage; doubled at every later stage.
    dtype: computation dtype (parameters stay float32).
  """

  stage_sizes: Sequence[int]
  block_cls: Callable[..., nn.Module]
  num_classes: int
  num_filters: int = 64
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, train: bool = True):
    conv, norm = _conv_and_norm(train, self.dtype)
    x = conv(
        self.num_filters,
        (7, 7),
        (2, 2),
        padding=[(3, 3), (3, 3)],
        name="conv_init",
    )(x)
    x = nn.relu(norm(name="bn_init")(x))
    x = nn.max_pool(x, (3, 3), strides=(2, 2), padding="SAME")
    for i, num_blocks in enumerate(self.stage_sizes):
      for j in range(num_blocks):
        x = self.block_cls(
            self.num_filters * 2**i,
            conv=conv,
            norm=norm,
            strides=2 if i > 0 and j == 0 else 1,
        )(x)
    x = jnp.mean(x, axis=(1, 2))
    return nn.Dense(self.num_classes, dtype=self.dtype, name="head")(x)


class MLP(nn.Module):
  """Flatten -> Dense -> [BatchNorm] -> ReLU -> Dense ``head``.

  Attributes:
    num_classes: classifier outputs.
    hidden: width of the hidden layer.
    use_bn: put BatchNorm between the hidden layer and the ReLU; the hidden
      layer then has no bias (BN's offset plays that role).
    dtype: computation dtype (parameters stay float32).
  """

  num_classes: int
  hidden: int = 256
  use_bn: bool = True
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, train: bool = True):
    x = x.reshape((x.shape[0], -1))
    x = nn.Dense(
        self.hidden, use_bias=not self.use_bn, dtype=self.dtype, name="hidden"
    )(x)
    if self.use_bn:
      x = nn.BatchNorm(
          use_running_average=not train,
          momentum=0.9,
          epsilon=1e-5,
          dtype=self.dtype,
          name="bn",
      )(x)
    x = nn.relu(x)
    return nn.Dense(self.num_classes, dtype=self.dtype, name="head")(x)


ResNet20 = functools.partial(CifarResNet, stage_sizes=(3, 3, 3))
ResNet32 = functools.partial(CifarResNet, stage_sizes=(5, 5, 5))
ResNet56 = functools.partial(CifarResNet, stage_sizes=(9, 9, 9))
ResNet18 = functools.partial(
    ResNet, stage_sizes=(2, 2, 2, 2), block_cls=BasicBlock
)
ResNet50 = functools.partial(
    ResNet, stage_sizes=(3, 4, 6, 3), block_cls=BottleneckBlock
)
FmnistResNet = functools.partial(
    CifarResNet, stage_sizes=(1, 1, 1), num_filters=8
)
FmnistMLP = MLP

MODELS = {
    "resnet20": ResNet20,
    "resnet32": ResNet32,
    "resnet56": ResNet56,
    "resnet18": ResNet18,
    "resnet50": ResNet50,
    "fmnist_resnet": FmnistResNet,
    "fmnist_mlp": FmnistMLP,
}


def create_model(
    name: str, *, num_classes: int, dtype: Any = jnp.float32, width: int = 0
) -> nn.Module:
  """Builds the preset ``name`` (a key of `MODELS`).

  Args:
    name: preset name.
    num_classes: classifier outputs.
    dtype: computation dtype.
    width: first-stage filters (ResNets) or hidden units (MLP); 0 keeps the
      preset's.
  """
  if name not in MODELS:
    raise ValueError(f"Unknown model {name!r}; choose from {sorted(MODELS)}.")
  kwargs = {}
  if width:
    kwargs["hidden" if name == "fmnist_mlp" else "num_filters"] = width
  return MODELS[name](num_classes=num_classes, dtype=dtype, **kwargs)
