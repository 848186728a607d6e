"""VGG-11 with BatchNorm in its CIFAR form, as in kuangliu/pytorch-cifar (the paper's 2nd network).

Configuration 64, M, 128, M, 256, 256, M, 512, 512, M, 512, 512, M: eight 3x3 conv (with bias) +
BatchNorm + ReLU layers, five 2x2 max-pools, then a single linear layer on the 512 features. With
10 classes and 3 input channels it has 9,231,114 trainable parameters, like the reference.

Inputs are NHWC images in [0, 1] (no normalisation; cast to float32), any number of channels.
The max-pools round odd sizes up (``SAME`` padding) and the classifier reads the spatial mean of
the last pool; for 32x32 inputs the last pool is 1x1, so this is exactly the reference (which
flattens it), and smaller inputs (8x8 digits) work too.

Named layers (outputs of top-level submodules, see `models.capture_activations`), with
w = ``width`` (64 in the reference) and c_k = w * min(2^(k-1), 8) the channels of stage k:

- ``"conv{i}"``, i = 1..8: the i-th conv after its ReLU, (B, ceil(H / 2^(k-1)),
  ceil(W / 2^(k-1)), c_k) for a conv of stage k;
- ``"pool{k}"``, k = 1..5: (B, ceil(H / 2^k), ceil(W / 2^k), c_k), output of the k-th max-pool.

For 32x32 inputs at full width: pool1 16x16x64, pool2 8x8x128, pool3 4x4x256, pool4 2x2x512,
pool5 1x1x512.

CPU speed: XLA's CPU backend runs a 3x3 convolution on maps of 2x2 pixels (conv7 and conv8 of a
32x32 input) far slower than the same product written as im2col + one matmul (512 channels,
batch 64: 660 ms against 8 ms), so `Conv3x3` switches to the latter on maps of at most
``im2col_max_pixels`` pixels (default 4; from 4x4 maps on, the convolution is as fast or faster).
On a shared 2-core CPU this made the full-width network's forward pass (batch 64) 7-19 times
and its gradient 3.5-10 times faster. Both paths use the same parameters and agree to float32
rounding.
"""
import functools
from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax

# PyTorch's BatchNorm defaults: running-average momentum 0.1 (0.9 in Flax's convention), eps 1e-5.
_BatchNorm = functools.partial(nn.BatchNorm, momentum=0.9, epsilon=1e-5)


class Conv3x3(nn.Module):
    """3x3 convolution, stride 1, zero padding 1, with bias: (B, H, W, C) -> (B, H, W, features).

    Its parameters are those of ``nn.Conv(features, (3, 3), padding=1)``: ``kernel``
    (3, 3, C, features) and ``bias`` (features,), with the same initialisers. Maps with
    H * W <= ``im2col_max_pixels`` are computed as im2col (the nine shifted copies of the padded
    input side by side, (B, H, W, 9 C)) times the kernel reshaped to (9 C, features); larger ones
    by ``lax.conv_general_dilated``.
    """

    features: int
    im2col_max_pixels: int = 4

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        _, h, w, c = x.shape
        kernel = self.param(
            "kernel", nn.initializers.lecun_normal(), (3, 3, c, self.features), jnp.float32
        )
        bias = self.param("bias", nn.initializers.zeros_init(), (self.features,), jnp.float32)
        if h * w <= self.im2col_max_pixels:
            padded = jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
            # Channel blocks in the kernel's (dy, dx, c) order.
            patches = jnp.concatenate(
                [padded[:, dy : dy + h, dx : dx + w, :] for dy in range(3) for dx in range(3)],
                axis=-1,
            )
            y = patches @ kernel.reshape(9 * c, self.features)
        else:
            y = lax.conv_general_dilated(
                x, kernel, (1, 1), ((1, 1), (1, 1)), dimension_numbers=("NHWC", "HWIO", "NHWC")
            )
        return y + bias.reshape(1, 1, 1, self.features)


class ConvBNReLU(nn.Module):
    """`Conv3x3` + BatchNorm + ReLU: (B, H, W, C) -> (B, H, W, features)."""

    features: int
    im2col_max_pixels: int = 4

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        x = Conv3x3(self.features, self.im2col_max_pixels)(x)
        return nn.relu(_BatchNorm(use_running_average=not train)(x))


class MaxPool(nn.Module):
    """2x2 max-pool, stride 2, rounding odd sizes up: (B, H, W, C) -> (B, H', W', C)."""

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        return nn.max_pool(x, (2, 2), strides=(2, 2), padding="SAME")


class VGG(nn.Module):
    """CIFAR-style VGG with BatchNorm: (B, H, W, C) images in [0, 1] -> (B, num_classes) logits.

    Attributes:
        num_classes: outputs of the linear classifier.
        stage_sizes: conv layers before each max-pool; stage k has ``width * min(2^(k-1), 8)``
            channels.
        width: channels of the first stage (64 in the reference).
        im2col_max_pixels: maps of at most this many pixels use the im2col path of `Conv3x3`
            (0: never).
    """

    num_classes: int
    stage_sizes: Sequence[int]
    width: int = 64
    im2col_max_pixels: int = 4

    @nn.nowrap
    def layer_modules(self) -> dict[str, str]:
        """Capturable layer names in forward order, each mapped to the submodule that outputs it."""
        names, i = [], 0
        for k, n_convs in enumerate(self.stage_sizes, start=1):
            names += [f"conv{i + j}" for j in range(1, n_convs + 1)] + [f"pool{k}"]
            i += n_convs
        return {name: name for name in names}

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        x, i = jnp.asarray(x, jnp.float32), 0
        for k, n_convs in enumerate(self.stage_sizes, start=1):
            features = self.width * min(2 ** (k - 1), 8)
            for _ in range(n_convs):
                i += 1
                x = ConvBNReLU(features, self.im2col_max_pixels, name=f"conv{i}")(x, train)
            x = MaxPool(name=f"pool{k}")(x)
        return nn.Dense(self.num_classes, name="head")(jnp.mean(x, axis=(1, 2)))


VGG11 = functools.partial(VGG, stage_sizes=(1, 1, 2, 2, 2))
"""VGG-11 with BatchNorm (CIFAR form): ``VGG11(num_classes=10)``, ``width=64`` unless given."""

TinyVGG11 = functools.partial(VGG11, width=8)
"""VGG-11 with 8 channels in the first stage instead of 64, for tests."""

LAYERS: tuple[str, ...] = (*VGG11(num_classes=1).layer_modules(), "softmax")
"""VGG-11's layer names for `models.capture_activations`; ``"softmax"`` (probabilities) last."""
