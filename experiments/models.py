"""Flax models for the SparseOpt experiments.

In the ResNets and the MLP every convolution is followed by BatchNorm, as in
the paper's networks: that BatchNorm is what turns uneven per-neuron sparsity
into gradient skew (the ViTs use LayerNorm and, optionally, QK-norm instead). The
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
  * ``ViT`` (``fmnist_vit``, ``fmnist_vit_qk`` with QK-norm): a small pre-LN
    vision transformer on 7x7 patches (16 tokens for 28x28 inputs), no
    BatchNorm. Its attention kernels are ``nn.DenseGeneral``: ``query``,
    ``key``, ``value`` ``(d_model, heads, head_dim)``, ``out``
    ``(heads, head_dim, d_model)``.
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


class SelfAttention(nn.Module):
  """Multi-head self-attention, with optional QK-norm.

  Attributes:
    heads: attention heads.
    head_dim: width of each head.
    qk_norm: RMS-normalize q and k per head over ``head_dim`` (one sigma per
      token and head) before the dot product.
    dtype: computation dtype.
  """

  heads: int
  head_dim: int
  qk_norm: bool = False
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    proj = functools.partial(
        nn.DenseGeneral, (self.heads, self.head_dim), dtype=self.dtype
    )
    q, k, v = proj(name="query")(x), proj(name="key")(x), proj(name="value")(x)
    if self.qk_norm:
      q = nn.RMSNorm(dtype=self.dtype, name="query_norm")(q)
      k = nn.RMSNorm(dtype=self.dtype, name="key_norm")(k)
    y = nn.dot_product_attention(q, k, v, dtype=self.dtype)
    return nn.DenseGeneral(
        x.shape[-1], axis=(-2, -1), dtype=self.dtype, name="out"
    )(y)


class ViTBlock(nn.Module):
  """Pre-LN block: x + attn(LN(x)), then x + MLP(LN(x)) with GELU."""

  heads: int
  mlp_dim: int
  qk_norm: bool = False
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    d = x.shape[-1]
    h = nn.LayerNorm(dtype=self.dtype, name="ln_attn")(x)
    x = x + SelfAttention(
        self.heads, d // self.heads, self.qk_norm, self.dtype, name="attn"
    )(h)
    h = nn.LayerNorm(dtype=self.dtype, name="ln_mlp")(x)
    h = nn.gelu(nn.Dense(self.mlp_dim, dtype=self.dtype, name="mlp_up")(h))
    return x + nn.Dense(d, dtype=self.dtype, name="mlp_down")(h)


class ViT(nn.Module):
  """A small pre-LN vision transformer (Dosovitskiy et al. 2021).

  Non-overlapping ``patch x patch`` patches, a linear patch embedding
  (``patch_embed``, a strided convolution) plus learned position embeddings
  (``pos_embed``), ``depth`` pre-LN blocks, a final LayerNorm, mean pooling
  over tokens and the ``head``. No BatchNorm, so the ``batch_stats``
  collection is empty.

  Attributes:
    num_classes: classifier outputs.
    d_model: token width.
    depth: number of blocks.
    heads: attention heads (``d_model`` must be a multiple).
    mlp_dim: hidden width of each block's MLP.
    patch: patch side in pixels.
    qk_norm: RMSNorm per head over ``head_dim`` on q and k.
    dtype: computation dtype (parameters stay float32).
  """

  num_classes: int
  d_model: int = 64
  depth: int = 4
  heads: int = 4
  mlp_dim: int = 128
  patch: int = 7
  qk_norm: bool = False
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, train: bool = True):
    del train  # No dropout, no BatchNorm.
    if self.d_model % self.heads:
      raise ValueError(
          f"d_model={self.d_model} is not a multiple of heads={self.heads}."
      )
    x = nn.Conv(
        self.d_model,
        (self.patch, self.patch),
        strides=(self.patch, self.patch),
        padding="VALID",
        dtype=self.dtype,
        name="patch_embed",
    )(x)
    x = x.reshape((x.shape[0], -1, self.d_model))
    pos = self.param(
        "pos_embed",
        nn.initializers.normal(0.02),
        (1, x.shape[1], self.d_model),
    )
    x = x + pos.astype(x.dtype)
    for i in range(self.depth):
      x = ViTBlock(
          self.heads, self.mlp_dim, self.qk_norm, self.dtype, name=f"block{i}"
      )(x)
    x = nn.LayerNorm(dtype=self.dtype, name="ln_final")(x).mean(axis=1)
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
FmnistViT = ViT
FmnistViTQK = functools.partial(ViT, qk_norm=True)

MODELS = {
    "resnet20": ResNet20,
    "resnet32": ResNet32,
    "resnet56": ResNet56,
    "resnet18": ResNet18,
    "resnet50": ResNet50,
    "fmnist_resnet": FmnistResNet,
    "fmnist_mlp": FmnistMLP,
    "fmnist_vit": FmnistViT,
    "fmnist_vit_qk": FmnistViTQK,
}
# The transformers among the presets: no BatchNorm; their attention kernels
# are ``nn.DenseGeneral`` with several neuron axes.
TRANSFORMERS = ("fmnist_vit", "fmnist_vit_qk")


def create_model(
    name: str, *, num_classes: int, dtype: Any = jnp.float32, width: int = 0
) -> nn.Module:
  """Builds the preset ``name`` (a key of `MODELS`).

  Args:
    name: preset name.
    num_classes: classifier outputs.
    dtype: computation dtype.
    width: first-stage filters (ResNets), hidden units (MLP) or ``d_model``
      (ViTs); 0 keeps the preset's.
  """
  if name not in MODELS:
    raise ValueError(f"Unknown model {name!r}; choose from {sorted(MODELS)}.")
  kwargs = {}
  if width:
    if name == "fmnist_mlp":
      kwargs["hidden"] = width
    elif name in TRANSFORMERS:
      kwargs["d_model"] = width
    else:
      kwargs["num_filters"] = width
  return MODELS[name](num_classes=num_classes, dtype=dtype, **kwargs)
