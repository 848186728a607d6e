"""Build the paper's networks by name and read their non-negative intermediate activations.

Layer names are those of `models.resnet.LAYERS` and `models.vgg.LAYERS` (see each module's
docstring for shapes); ``"softmax"``, the class probabilities, is a valid layer of both. Logits
are not offered: they can be negative, and every block given to the NMF must not be.

Example::

    model = build_model("resnet18", num_classes=10, width=8)
    variables = init_variables(model, jax.random.key(0), (1, 32, 32, 3))
    acts = capture_activations(model, variables, images, DEFAULT_LAYERS["resnet18"])
    acts["stage3"].shape  # (B, 8, 8, 32): 256 channels at width 64
"""
import functools
from typing import Sequence

import flax
import flax.errors
import flax.linen as nn
import jax
import jax.numpy as jnp

from models import resnet, vgg
from models.resnet import ResNet, ResNet18
from models.vgg import VGG, VGG11

SOFTMAX = "softmax"

LAYERS: dict[str, tuple[str, ...]] = {"resnet18": resnet.LAYERS, "vgg11": vgg.LAYERS}
"""Every layer `capture_activations` accepts, per model name."""

DEFAULT_LAYERS: dict[str, tuple[str, ...]] = {
    "resnet18": ("stage3", "stage4", "pool"),
    "vgg11": ("pool1", "pool2", "pool3", "pool4", "pool5"),
}
"""The layers the paper's authors analysed, per model name (docs/method.md)."""

_MODELS = {"resnet18": ResNet18, "vgg11": VGG11}


def build_model(name: str, num_classes: int, *, width: int = 64, **kwargs) -> ResNet | VGG:
    """The network ``name`` ("resnet18" or "vgg11") with ``num_classes`` outputs.

    ``width`` is the number of channels of the first stage (64 in the reference; 8 is a tiny
    network for tests); ``kwargs`` are further fields of `ResNet` or `VGG` (lists become tuples,
    so that kwargs read back from JSON give a hashable module).
    """
    if name not in _MODELS:
        raise ValueError(f"name must be one of {sorted(_MODELS)}, got {name!r}")
    for arg, value in (("num_classes", num_classes), ("width", width)):
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"{arg} must be a positive integer, got {value!r}")
    kwargs = {k: tuple(v) if isinstance(v, list) else v for k, v in kwargs.items()}
    return _MODELS[name](num_classes=num_classes, width=width, **kwargs)


def init_variables(model: nn.Module, key: jax.Array, input_shape: Sequence[int]) -> dict:
    """Fresh ``{"params", "batch_stats"}`` of ``model``; ``input_shape`` is (B, H, W, C)."""
    if len(input_shape) != 4:
        raise ValueError(f"input_shape must be (B, H, W, C), got {input_shape}")
    return _init(model, key, tuple(input_shape))


@functools.partial(jax.jit, static_argnums=(0, 2))
def _init(model, key, input_shape):
    return model.init(key, jnp.zeros(input_shape, jnp.float32), train=False)


def capture_activations(
    model: ResNet | VGG, variables: dict, images: jax.Array, layers: Sequence[str]
) -> dict[str, jax.Array]:
    """Post-ReLU (non-negative) activations of ``layers`` for a batch, in inference mode.

    Args:
        model: a `ResNet` or `VGG`.
        variables: its ``{"params", "batch_stats"}``.
        images: (B, H, W, C) images in [0, 1].
        layers: names from the model's ``LAYERS`` (e.g. ``DEFAULT_LAYERS["resnet18"]``).

    Returns:
        ``{name: activations}``, float32: (B, H', W', C') for spatial layers (NHWC), (B, C') for
        ``"pool"`` and (B, num_classes) for ``"softmax"``. The keys follow the order of
        ``layers``, except under a caller's `jax.jit` (with ``model`` and ``layers``, a tuple,
        static), which returns dicts in sorted key order.
    """
    if isinstance(layers, str):
        raise ValueError(f"layers must be a sequence of layer names, got the string {layers!r}")
    layers = tuple(layers)
    valid = (*model.layer_modules(), SOFTMAX)
    for name in layers:
        if name not in valid:
            raise ValueError(f"unknown layer {name!r} for {type(model).__name__}; valid: {valid}")
    if jnp.ndim(images) != 4:
        raise ValueError(f"images must be (B, H, W, C), got shape {jnp.shape(images)}")
    if not jnp.issubdtype(jnp.result_type(images), jnp.floating):
        raise ValueError(f"images must be floats in [0, 1], got dtype {jnp.result_type(images)}")
    try:
        captured = _capture(model, layers, variables, images)
    except flax.errors.ScopeParamShapeError as error:  # the images do not fit the variables' first layer
        raise ValueError(f"images of shape {tuple(jnp.shape(images))} do not fit the model's variables (its "
                         f"input channels differ): {str(error).split(' (https')[0]}") from None
    except (flax.errors.ScopeCollectionNotFound, flax.errors.ScopeParamNotFoundError) as error:
        raise ValueError(f"variables must be the model's {{'params', 'batch_stats'}}: "
                         f"{str(error).split(' (https')[0]}") from None
    return {name: captured[name] for name in layers}  # jit returns dicts in sorted key order


@functools.partial(jax.jit, static_argnums=(0, 1))
def _capture(model, layers, variables, images):
    modules = model.layer_modules()
    wanted = {modules[name] for name in layers if name != SOFTMAX}

    def is_wanted(module: nn.Module, method_name: str) -> bool:
        return method_name == "__call__" and len(module.path) == 1 and module.path[0] in wanted

    logits, state = model.apply(
        variables, images, train=False, capture_intermediates=is_wanted, mutable=["intermediates"]
    )
    captured = state.get("intermediates", {})
    return {
        name: jax.nn.softmax(logits) if name == SOFTMAX else captured[modules[name]]["__call__"][0]
        for name in layers
    }
