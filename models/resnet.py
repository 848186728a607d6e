"""ResNet-18 in its CIFAR form, as in kuangliu/pytorch-cifar (the network the paper analysed).

A 3x3 stem (conv 64 + BatchNorm + ReLU, no max-pool), four stages of two BasicBlocks each with
64, 128, 256, 512 channels (stride 2 at the start of stages 2-4, 1x1 conv + BatchNorm shortcut
where the shape changes), convolutions without bias, global average pooling and a linear head.
With 10 classes and 3 input channels it has 11,173,962 trainable parameters, like the reference.

Inputs are NHWC images in [0, 1] (no normalisation; cast to float32), any size and number of
channels. Every named layer is the output of a top-level submodule, so that
`capture_intermediates` can pick it out (see `models.capture_activations`); with w = ``width``
(64 in the reference):

- ``"stem"``: (B, H, W, w), after the stem's ReLU;
- ``"stage{s}_block{b}"``: (B, H / 2^(s-1), W / 2^(s-1), w 2^(s-1)), block b of stage s, after the
  residual addition and its ReLU;
- ``"stage{s}"``: the output of stage s, the same array as its last block;
- ``"pool"``: (B, 8 w), global average of stage 4 (the features the linear head reads).

For 32x32 inputs at full width: stem 32x32x64, stage1 32x32x64, stage2 16x16x128,
stage3 8x8x256, stage4 4x4x512, pool 512.
"""
import functools
from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

# PyTorch's BatchNorm defaults: running-average momentum 0.1 (0.9 in Flax's convention), eps 1e-5.
_BatchNorm = functools.partial(nn.BatchNorm, momentum=0.9, epsilon=1e-5)


class GlobalAvgPool(nn.Module):
    """Mean over the spatial axes: (B, H, W, C) -> (B, C)."""

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        return jnp.mean(x, axis=(1, 2))


class Stem(nn.Module):
    """3x3 conv without bias + BatchNorm + ReLU: (B, H, W, C_in) -> (B, H, W, features)."""

    features: int

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        x = nn.Conv(self.features, (3, 3), padding=1, use_bias=False)(x)
        return nn.relu(_BatchNorm(use_running_average=not train)(x))


class BasicBlock(nn.Module):
    """Two 3x3 conv + BatchNorm layers and a residual connection, ReLU after the addition.

    (B, H, W, C_in) -> (B, H / strides, W / strides, features). The shortcut is the identity, or a
    1x1 conv (stride ``strides``, no bias) + BatchNorm where the shape changes.
    """

    features: int
    strides: int = 1

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        s = (self.strides, self.strides)
        y = nn.Conv(self.features, (3, 3), s, padding=1, use_bias=False, name="conv1")(x)
        y = nn.relu(_BatchNorm(use_running_average=not train, name="bn1")(y))
        y = nn.Conv(self.features, (3, 3), padding=1, use_bias=False, name="conv2")(y)
        y = _BatchNorm(use_running_average=not train, name="bn2")(y)
        if self.strides != 1 or x.shape[-1] != self.features:
            x = nn.Conv(self.features, (1, 1), s, use_bias=False, name="shortcut_conv")(x)
            x = _BatchNorm(use_running_average=not train, name="shortcut_bn")(x)
        return nn.relu(y + x)


class ResNet(nn.Module):
    """CIFAR-style ResNet of BasicBlocks: (B, H, W, C) images in [0, 1] -> (B, num_classes) logits.

    Attributes:
        num_classes: outputs of the linear head.
        stage_sizes: blocks per stage; stage s has ``width * 2^(s-1)`` channels and, from the
            second stage on, halves the spatial size in its first block.
        width: channels of the stem and of stage 1 (64 in the reference).
    """

    num_classes: int
    stage_sizes: Sequence[int]
    width: int = 64

    @nn.nowrap
    def layer_modules(self) -> dict[str, str]:
        """Capturable layer names in forward order, each mapped to the submodule that outputs it."""
        modules = {"stem": "stem"}
        for s, n_blocks in enumerate(self.stage_sizes, start=1):
            blocks = [f"stage{s}_block{b}" for b in range(1, n_blocks + 1)]
            modules.update({name: name for name in blocks})
            modules[f"stage{s}"] = blocks[-1]
        modules["pool"] = "pool"
        return modules

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        x = Stem(self.width, name="stem")(jnp.asarray(x, jnp.float32), train)
        for s, n_blocks in enumerate(self.stage_sizes, start=1):
            for b in range(1, n_blocks + 1):
                strides = 2 if s > 1 and b == 1 else 1
                block = BasicBlock(self.width * 2 ** (s - 1), strides, name=f"stage{s}_block{b}")
                x = block(x, train)
        x = GlobalAvgPool(name="pool")(x)
        return nn.Dense(self.num_classes, name="head")(x)


ResNet18 = functools.partial(ResNet, stage_sizes=(2, 2, 2, 2))
"""ResNet-18 (CIFAR form): ``ResNet18(num_classes=10)``, ``width=64`` unless given."""

TinyResNet18 = functools.partial(ResNet18, width=8)
"""ResNet-18 with 8 base channels instead of 64, for tests."""

LAYERS: tuple[str, ...] = (*ResNet18(num_classes=1).layer_modules(), "softmax")
"""ResNet-18's layer names for `models.capture_activations`; ``"softmax"`` (probabilities) last."""
