"""Build the paper's networks by name and read their non-negative intermediate activations.

Layer names are those of `models.resnet.LAYERS` and `models.vgg.LAYERS` (see each module's
docstring for shapes); ``"softmax"``, the class probabilities, is a valid layer of both. Logits
are not offered: they can be negative, and every block given to the NMF must not be.

Example::

    model = build_model("resnet18", num_classes=10, width=8)
    variables = init_variables(model, jax.random.key(0), (1, 32, 32, 3))
    acts = capture_activations(model, variables, images, DEFAULT_LAYERS["resnet18"])
    acts["stage3"].shape  # (B, 8, 8, 32): 256 channels at width 64

Any other Flax Linen network whose ``apply(variables, images, ...)`` returns logits is read by
module path (`layer_paths` lists them, `capture_paths` captures them); `activation_function`
turns a network or any JAX function ``images -> {layer: activation}`` into the function
``experiments.matrices.build_blocks`` takes, and `check_non_negative` refuses a layer taken
before its ReLU. Example::

    paths = layer_paths(my_model, variables, images.shape)   # {"block1": (16, 16, 8), ...}
    acts = capture_paths(my_model, variables, images, ["block1", "block2/ReLU_0"])
"""
import dataclasses
import functools
import importlib
import inspect
from collections.abc import Callable, Mapping
from typing import Any, Sequence

import flax
import flax.errors
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

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
        raise ValueError(f"name must be one of {sorted(_MODELS)}, got {name!r} (any other Flax module: "
                         f"rebuild_model with its import path 'package.module:Class')")
    for arg, value in (("num_classes", num_classes), ("width", width)):
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"{arg} must be a positive integer, got {value!r}")
    kwargs = {k: tuple(v) if isinstance(v, list) else v for k, v in kwargs.items()}
    return _MODELS[name](num_classes=num_classes, width=width, **kwargs)


def model_spec(model: nn.Module) -> tuple[str, dict]:
    """``(name, kwargs)`` that rebuild ``model`` with `rebuild_model` (and so with
    ``models.load_model`` after ``models.save_model(path, *model_spec(model), ...)``): the
    project's networks by name, any other Linen module by its import path ``"module:Class"``
    and its fields (which must be JSON values: numbers, strings, lists).

    The class must be importable by that path where the model is loaded (a module-level class;
    loading imports that module)."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a Flax Linen module, got {type(model).__name__}")
    fields = {f.name: getattr(model, f.name) for f in dataclasses.fields(model)
              if f.init and f.name not in ("parent", "name")}
    as_json = lambda values: {k: list(v) if isinstance(v, tuple) else v for k, v in values.items()}
    for project_name, cls in (("resnet18", ResNet), ("vgg11", VGG)):
        if type(model) is cls and tuple(fields.get("stage_sizes", ())) == _MODELS[project_name].keywords["stage_sizes"]:
            return project_name, as_json({k: v for k, v in fields.items() if k != "stage_sizes"})
    cls = type(model)
    if "<locals>" in cls.__qualname__:
        raise ValueError(f"{cls.__qualname__} is defined inside a function: define it at module level so that "
                         "load_model can import it")
    return f"{cls.__module__}:{cls.__qualname__}", as_json(fields)


def rebuild_model(name: str, kwargs: Mapping) -> nn.Module:
    """The module `model_spec` described: ``build_model(name, **kwargs)`` for the project's
    networks, the class at the import path ``"module:Class"`` built with ``kwargs`` otherwise."""
    if isinstance(name, str) and ":" in name:
        return _imported_model(name, **kwargs)
    return build_model(name, **kwargs)


def _imported_model(path: str, **kwargs) -> nn.Module:
    """The Linen module of class ``"package.module:Class"`` built with ``kwargs`` (lists become
    tuples); ``num_classes`` and ``width`` are passed only when the class has those fields."""
    module_name, _, class_name = path.partition(":")
    try:
        cls = importlib.import_module(module_name)
        for part in class_name.split("."):
            cls = getattr(cls, part)
    except (ImportError, AttributeError) as error:
        hint = (" (a class defined in a script run as __main__ loads only in that script: define it in an importable "
                "module)" if module_name == "__main__" else "")
        raise ValueError(f"name {path!r}: cannot import the model class ({type(error).__name__}: {error}){hint}") from None
    if not (isinstance(cls, type) and issubclass(cls, nn.Module)):
        raise ValueError(f"name {path!r} is not a Flax Linen module class")
    names = {f.name for f in dataclasses.fields(cls)}
    kwargs = {k: tuple(v) if isinstance(v, list) else v for k, v in kwargs.items() if k in names or
              k not in ("num_classes", "width")}
    try:
        return cls(**kwargs)
    except TypeError as error:
        raise ValueError(f"name {path!r}: {error}") from None


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
    modules = model.layer_modules()
    paths = tuple(dict.fromkeys(modules[name] for name in layers if name != SOFTMAX))
    try:
        captured, logits = _capture(model, paths, (("train", False),), variables, images)
    except flax.errors.ScopeParamShapeError as error:  # the images do not fit the variables' first layer
        raise ValueError(f"images of shape {tuple(jnp.shape(images))} do not fit the model's variables (its "
                         f"input channels differ): {str(error).split(' (https')[0]}") from None
    except (flax.errors.ScopeCollectionNotFound, flax.errors.ScopeParamNotFoundError) as error:
        raise ValueError(f"variables must be the model's {{'params', 'batch_stats'}}: "
                         f"{str(error).split(' (https')[0]}") from None
    return {name: jax.nn.softmax(logits) if name == SOFTMAX else captured[modules[name]] for name in layers}


# ----------------------------------------------------------------------------- any Flax network
def _path_name(keys: Sequence[str]) -> str:
    return "/".join(keys)


def _intermediates(tree: Mapping, prefix: tuple[str, ...] = ()) -> dict[str, Any]:
    """``{path: first recorded value}`` of a Flax ``intermediates`` collection: a module's output
    (key ``"__call__"``) under the module's path ``"a/b"``, a value sown with ``self.sow`` under
    ``"a/b/<its name>"``."""
    out = {}
    for key, value in tree.items():
        if isinstance(value, Mapping):
            out.update(_intermediates(value, (*prefix, key)))
        elif isinstance(value, (tuple, list)) and value:
            name = _path_name(prefix) if key == "__call__" else _path_name((*prefix, key))
            if name and hasattr(value[0], "shape"):  # the root's output (the logits) is not a layer
                out.setdefault(name, value[0])
    return out


def inference_kwargs(model: nn.Module) -> dict[str, bool]:
    """The keyword arguments that put ``model.__call__`` in inference mode, read from its
    signature: ``train=False``, ``training=False``, ``deterministic=True`` or
    ``use_running_average=True`` for the parameters of those names it has; ``{}`` otherwise."""
    try:
        parameters = inspect.signature(type(model).__call__).parameters
    except (TypeError, ValueError):
        return {}
    known = {"train": False, "training": False, "is_training": False, "deterministic": True,
             "use_running_average": True}
    return {name: value for name, value in known.items() if name in parameters}


def _apply_kwargs(model: nn.Module, apply_kwargs: Mapping | None) -> tuple:
    kwargs = inference_kwargs(model) if apply_kwargs is None else dict(apply_kwargs)
    return tuple(sorted(kwargs.items()))


def layer_paths(model: nn.Module, variables: dict, input_shape: Sequence[int], *,
                apply_kwargs: Mapping | None = None) -> dict[str, tuple[int, ...]]:
    """Every layer `capture_paths` can read from ``model``, with its output shape.

    Names are the module paths as Flax reports them (``module.path`` joined by ``/``, e.g.
    ``"block1"``, ``"block1/Conv_0"``, ``"Dense_0"``), plus ``"<module path>/<name>"`` for a value
    sown with ``self.sow("intermediates", name, x)``, in forward order. Nothing is computed
    (``jax.eval_shape``).

    Args:
        model: a Flax Linen module; ``model.apply(variables, images, **apply_kwargs)`` returns
            the logits.
        variables: its variables.
        input_shape: (B, H, W, C) of the images.
        apply_kwargs: keyword arguments of ``apply`` (default `inference_kwargs` of the model).

    Returns:
        ``{path: shape without the batch axis}`` of every array-valued output.
    """
    shape = jax.ShapeDtypeStruct(tuple(input_shape), jnp.float32)
    kwargs = _apply_kwargs(model, apply_kwargs)

    def everything(v, x):
        _, state = model.apply(v, x, capture_intermediates=True, mutable=["intermediates"], **dict(kwargs))
        return _intermediates(state.get("intermediates", {}))

    try:
        shapes = jax.eval_shape(everything, variables, shape)
    except flax.errors.FlaxError as error:
        raise ValueError(f"images of shape {tuple(input_shape)} do not fit {type(model).__name__} and its variables: "
                         f"{str(error).split(' (https')[0]}") from None
    return {name: tuple(s.shape[1:]) for name, s in shapes.items()}


def capture_paths(model: nn.Module, variables: dict, images: jax.Array, layers: Sequence[str], *,
                  apply_kwargs: Mapping | None = None) -> dict[str, jax.Array]:
    """Activations of any Flax Linen network, read by module path, in inference mode.

    ``capture_intermediates`` is given a filter that keeps the outputs of the modules named in
    ``layers`` only; values sown into ``"intermediates"`` are read as well.

    Args:
        model: a Flax Linen module whose ``apply(variables, images, **apply_kwargs)`` returns
            logits (B, classes).
        variables: its variables.
        images: (B, H, W, C) floats.
        layers: paths from `layer_paths` (e.g. ``"block2"``, ``"block2/Conv_0"``), and
            ``"softmax"`` for the class probabilities of the logits.
        apply_kwargs: keyword arguments of ``apply`` (default `inference_kwargs`, e.g.
            ``train=False``).

    Returns:
        ``{layer: activations}`` in the order of ``layers`` (float32 as the network gives them).

    Raises:
        ValueError: a layer that is not a path of ``model`` (the message lists the valid
            paths), or images that do not fit the variables.
    """
    if isinstance(layers, str):
        raise ValueError(f"layers must be a sequence of layer names, got the string {layers!r}")
    layers = tuple(layers)
    if jnp.ndim(images) != 4:
        raise ValueError(f"images must be (B, H, W, C), got shape {jnp.shape(images)}")
    valid = layer_paths(model, variables, jnp.shape(images), apply_kwargs=apply_kwargs)
    for name in layers:
        if name != SOFTMAX and name not in valid:
            raise ValueError(f"layers: unknown layer {name!r} for {type(model).__name__}; valid module paths: "
                             f"{(*valid, SOFTMAX)}")
    paths = tuple(dict.fromkeys(name for name in layers if name != SOFTMAX))
    captured, logits = _capture(model, paths, _apply_kwargs(model, apply_kwargs), variables, images)
    return {name: jax.nn.softmax(logits) if name == SOFTMAX else captured[name] for name in layers}


@functools.partial(jax.jit, static_argnums=(0, 1, 2))
def _capture(model, paths, kwargs, variables, images):
    """(``{path: first output}``, logits) of ``model``; only the modules at ``paths`` are captured."""
    wanted = frozenset(paths)

    def is_wanted(module: nn.Module, method_name: str) -> bool:
        return method_name == "__call__" and _path_name(module.path) in wanted

    logits, state = model.apply(variables, images, capture_intermediates=is_wanted, mutable=["intermediates"],
                                **dict(kwargs))
    captured = _intermediates(state.get("intermediates", {}))
    return {path: captured[path] for path in paths}, logits


def activation_function(model_or_fn: nn.Module | Callable, variables: dict | None, layers: Sequence[str], *,
                        input_shape: Sequence[int] | None = None,
                        apply_kwargs: Mapping | None = None) -> Callable[[jax.Array], dict[str, jax.Array]]:
    """``images -> {layer: activations}`` for `experiments.matrices.build_blocks`, for
    ``layers`` (names, without ``":avg"``).

    ``model_or_fn`` is either a Flax Linen module (read with `capture_activations` for the
    project's `ResNet` and `VGG`, whose layer names are those of ``LAYERS``, and with
    `capture_paths` otherwise), or any JAX function ``images -> {layer: activation}`` (then
    ``variables`` is unused and may be None). With ``input_shape`` (B, H, W, C), the layer names
    are checked at once (a ValueError lists the valid ones).
    """
    if isinstance(layers, str):
        raise ValueError(f"layers must be a sequence of layer names, got the string {layers!r}")
    layers = tuple(layers)
    if isinstance(model_or_fn, (ResNet, VGG)) and apply_kwargs is None:
        valid = (*model_or_fn.layer_modules(), SOFTMAX)
        for name in layers:
            if name not in valid:
                raise ValueError(f"layers: unknown layer {name!r} for {type(model_or_fn).__name__}; valid: {valid}")
        return lambda x: capture_activations(model_or_fn, variables, x, layers)
    if isinstance(model_or_fn, nn.Module):
        if input_shape is not None:
            valid = layer_paths(model_or_fn, variables, (1, *tuple(input_shape)[1:]), apply_kwargs=apply_kwargs)
            for name in layers:
                if name != SOFTMAX and name not in valid:
                    raise ValueError(f"layers: unknown layer {name!r} for {type(model_or_fn).__name__}; valid module "
                                     f"paths: {(*valid, SOFTMAX)}")
        return lambda x: capture_paths(model_or_fn, variables, x, layers, apply_kwargs=apply_kwargs)
    if not callable(model_or_fn):
        raise TypeError(f"model_or_fn must be a Flax Linen module or a function images -> {{layer: activation}}, "
                        f"got {type(model_or_fn).__name__}")
    if input_shape is not None:
        shapes = jax.eval_shape(model_or_fn, jax.ShapeDtypeStruct((1, *tuple(input_shape)[1:]), jnp.float32))
        if not isinstance(shapes, Mapping):
            raise TypeError(f"model_or_fn must return a mapping {{layer: activation}}, got {type(shapes).__name__}")
        for name in layers:
            if name not in shapes:
                raise ValueError(f"layers: unknown layer {name!r}: the function returns {tuple(shapes)}")
    return lambda x: _pick(model_or_fn(x), layers)


def _pick(activations: Mapping, layers: tuple[str, ...]) -> dict:
    return {name: activations[name] for name in layers}


def check_non_negative(activation_fn: Callable, images, layers: Sequence[str], *, batch_size: int = 256) -> None:
    """Raise a ValueError naming the first of ``layers`` with a negative value on ``images``.

    Every block of the NMF must be non-negative, so a layer is taken after its ReLU; a negative
    value means the module's output comes before it (in Flax, ``nn.relu`` is a function, not a
    module: wrap the ReLU in a module of its own, or ``self.sow("intermediates", name, x)``
    after it, and capture that).
    """
    images = np.asarray(images)
    smallest = {name: np.inf for name in layers}
    for start in range(0, len(images), batch_size):
        activations = activation_fn(jnp.asarray(images[start:start + batch_size], jnp.float32))
        for name in layers:
            smallest[name] = min(smallest[name], float(jnp.min(activations[name])))
    for name, low in smallest.items():
        if low < 0:
            raise ValueError(
                f"layers: layer {name!r} has negative values on the probe images (min {low:.4g}): it is taken before "
                f"its ReLU, and every NMF block must be non-negative. Choose the output after the activation (a "
                f"ReLU module of its own, or a value sown with self.sow('intermediates', name, x) after nn.relu), "
                f"or pass a function images -> {{layer: activation}} that applies it")
