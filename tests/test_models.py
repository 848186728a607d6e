"""Architecture, named layers and the VGG fast path of `models`."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import models
from models import vgg

# Output (H, W, C) of each stage at full width for 32x32 inputs (kuangliu/pytorch-cifar).
RESNET_STAGES = {1: (32, 32, 64), 2: (16, 16, 128), 3: (8, 8, 256), 4: (4, 4, 512)}
VGG_CONVS = {1: (32, 32, 64), 2: (16, 16, 128), 3: (8, 8, 256), 4: (8, 8, 256),
             5: (4, 4, 512), 6: (4, 4, 512), 7: (2, 2, 512), 8: (2, 2, 512)}
VGG_POOLS = {1: (16, 16, 64), 2: (8, 8, 128), 3: (4, 4, 256), 4: (2, 2, 512), 5: (1, 1, 512)}

# XLA:CPU compiles the threefry bits of some 60 parameter initialisers in seconds; rbg in less.
INIT_KEY = jax.random.key(0, impl="rbg")


def full_width_shapes(name: str, num_classes: int) -> dict[str, tuple[int, ...]]:
    """Per-image shape of every layer of the full-width network for 32x32 inputs."""
    if name == "resnet18":
        shapes = {"stem": (32, 32, 64), "pool": (512,)}
        for s, shape in RESNET_STAGES.items():
            shapes |= {f"stage{s}": shape, f"stage{s}_block1": shape, f"stage{s}_block2": shape}
    else:
        shapes = {f"conv{i}": shape for i, shape in VGG_CONVS.items()}
        shapes |= {f"pool{k}": shape for k, shape in VGG_POOLS.items()}
    return shapes | {"softmax": (num_classes,)}


def resnet18_param_count(num_classes: int, in_channels: int = 3, width: int = 64) -> int:
    """Trainable parameters of kuangliu's ResNet-18, counted layer by layer."""
    def conv_bn(c_in, c_out, k):  # conv without bias + BatchNorm (scale, bias)
        return k * k * c_in * c_out + 2 * c_out

    n, c_in = conv_bn(in_channels, width, 3), width
    for s in range(4):
        c = width * 2**s
        n += conv_bn(c_in, c, 3) + conv_bn(c, c, 3) + 2 * conv_bn(c, c, 3)
        if c != c_in:
            n += conv_bn(c_in, c, 1)
        c_in = c
    return n + c_in * num_classes + num_classes


def vgg11_param_count(num_classes: int, in_channels: int = 3, width: int = 64) -> int:
    """Trainable parameters of kuangliu's VGG-11 (with BatchNorm), counted layer by layer."""
    n, c_in = 0, in_channels
    for c in (1, 2, 4, 4, 8, 8, 8, 8):
        n += 9 * c_in * c * width + c * width + 2 * c * width  # conv with bias + BatchNorm
        c_in = c * width
    return n + c_in * num_classes + num_classes


def count_params(model, input_shape) -> int:
    init = lambda key: models.init_variables(model, key, input_shape)
    shapes = jax.eval_shape(init, jax.random.key(0))
    return sum(x.size for x in jax.tree.leaves(shapes["params"]))


def test_analytic_counts_match_the_pytorch_reference():
    # sum(p.numel() for p in model.parameters()) of kuangliu's ResNet18() and VGG('VGG11').
    assert resnet18_param_count(10) == 11_173_962
    assert vgg11_param_count(10) == 9_231_114


@pytest.mark.parametrize("num_classes", [10, 100])
@pytest.mark.parametrize("in_channels", [3, 1])
@pytest.mark.parametrize(
    "name, formula", [("resnet18", resnet18_param_count), ("vgg11", vgg11_param_count)]
)
def test_parameter_counts(name, formula, num_classes, in_channels):
    for width in (64, 8):
        model = models.build_model(name, num_classes, width=width)
        got = count_params(model, (1, 32, 32, in_channels))
        assert got == formula(num_classes, in_channels, width)


def test_full_width_layer_shapes():
    x = jax.ShapeDtypeStruct((2, 32, 32, 3), jnp.float32)
    for name in ("resnet18", "vgg11"):
        model = models.build_model(name, 100)
        shapes = jax.eval_shape(
            lambda k, x: models.capture_activations(
                model, models.init_variables(model, k, x.shape), x, models.LAYERS[name]
            ),
            jax.random.key(0),
            x,
        )
        expected = {layer: (2, *shape) for layer, shape in full_width_shapes(name, 100).items()}
        assert {layer: a.shape for layer, a in shapes.items()} == expected
        assert set(models.LAYERS[name]) == set(expected)
        assert set(models.DEFAULT_LAYERS[name]) <= set(expected)


@pytest.fixture(scope="module", params=["resnet18", "vgg11"])
def tiny(request):
    """A width-8 network, its variables (BatchNorm statistics made non-trivial) and 32x32 images."""
    model = models.build_model(request.param, 10, width=8)
    variables = models.init_variables(model, INIT_KEY, (1, 32, 32, 3))
    images = jax.random.uniform(jax.random.key(1), (3, 32, 32, 3), jnp.float32)
    return request.param, model, perturb_batch_stats(variables), images


def perturb_batch_stats(variables):
    """Random running means in [-0.5, 0.5) and variances in [0.5, 1.5) instead of 0 and 1."""
    leaves, treedef = jax.tree.flatten(variables["batch_stats"])
    keys = jax.random.split(jax.random.key(2), len(leaves))
    leaves = [jax.random.uniform(k, x.shape, x.dtype) - 0.5 + x for k, x in zip(keys, leaves)]
    return {**variables, "batch_stats": jax.tree.unflatten(treedef, leaves)}


def test_captured_layers(tiny):
    name, model, variables, images = tiny
    layers = models.LAYERS[name]
    capture = jax.jit(models.capture_activations, static_argnums=(0, 3))
    acts = capture(model, variables, images, layers)
    assert set(acts) == set(layers)
    for layer, shape in full_width_shapes(name, 10).items():
        a = acts[layer]
        channels = shape[-1] if layer == "softmax" else shape[-1] * 8 // 64
        assert a.shape == (3, *shape[:-1], channels), layer
        assert a.dtype == jnp.float32
        assert jnp.all(a >= 0), layer
        assert jnp.any(a > 0), layer

    logits = jax.jit(lambda v, x: model.apply(v, x, train=False))(variables, images)
    np.testing.assert_allclose(acts["softmax"], jax.nn.softmax(logits), rtol=1e-6)
    # Called outside jit, it keeps the order of the layers asked for.
    ordered = models.capture_activations(model, variables, images, models.DEFAULT_LAYERS[name])
    assert list(ordered) == list(models.DEFAULT_LAYERS[name])
    for layer, a in ordered.items():
        np.testing.assert_allclose(a, acts[layer], rtol=1e-6, atol=1e-7)
    if name == "resnet18":
        for s in range(1, 5):
            np.testing.assert_array_equal(acts[f"stage{s}"], acts[f"stage{s}_block2"])
        np.testing.assert_allclose(acts["pool"], acts["stage4"].mean(axis=(1, 2)), rtol=1e-6)
    else:
        conv1 = acts["conv1"].reshape(3, 16, 2, 16, 2, 8)
        np.testing.assert_array_equal(acts["pool1"], conv1.max(axis=(2, 4)))


@pytest.mark.parametrize("layer", ["logits", "head", "stage5", "pool6"])
def test_unknown_layer_names_the_layer(layer):
    model = models.TinyResNet18(num_classes=10)
    with pytest.raises(ValueError, match=f"'{layer}'.*valid.*'stage3'"):
        models.capture_activations(model, {}, jnp.zeros((1, 8, 8, 3), jnp.float32), [layer])


def test_layers_must_be_a_sequence_of_names():
    model = models.TinyVGG11(num_classes=10)
    with pytest.raises(ValueError, match="layers"):
        models.capture_activations(model, {}, jnp.zeros((1, 8, 8, 3), jnp.float32), "pool1")


def test_any_input_size_and_channels():
    for model in (models.TinyResNet18(num_classes=7), models.TinyVGG11(num_classes=7)):
        x = jax.ShapeDtypeStruct((2, 8, 8, 1), jnp.float32)
        init = lambda key: models.init_variables(model, key, x.shape)
        variables = jax.eval_shape(init, jax.random.key(0))
        logits = jax.eval_shape(lambda v, x: model.apply(v, x, train=False), variables, x)
        assert logits.shape == (2, 7)
    acts = jax.eval_shape(
        lambda v, x: models.capture_activations(model, v, x, ("pool3", "pool5")), variables, x
    )
    assert acts["pool3"].shape == (2, 1, 1, 32) and acts["pool5"].shape == (2, 1, 1, 64)


def test_build_model_rejects_bad_arguments():
    with pytest.raises(ValueError, match="name"):
        models.build_model("resnet50", 10)
    with pytest.raises(ValueError, match="num_classes"):
        models.build_model("vgg11", 0)
    with pytest.raises(ValueError, match="width"):
        models.build_model("resnet18", 10, width=-8)
    assert models.build_model("resnet18", 10, stage_sizes=[1, 1]).stage_sizes == (1, 1)


@pytest.mark.parametrize("hw", [(1, 1), (2, 2), (1, 3), (3, 2), (4, 4)])
def test_conv3x3_im2col_equals_conv(hw):
    shapes = [(2, *hw, 5), (3, 3, 5, 7), (7,)]
    keys = jax.random.split(jax.random.key(0), 3)
    x, kernel, bias = (jax.random.normal(k, s, jnp.float32) for k, s in zip(keys, shapes))
    params = {"params": {"kernel": kernel, "bias": bias}}
    expected = nn.Conv(7, (3, 3), padding=1).apply(params, x)
    for max_pixels in (0, 16):  # the convolution, then im2col for every size here
        got = vgg.Conv3x3(7, im2col_max_pixels=max_pixels).apply(params, x)
        np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6)


def test_conv3x3_uses_im2col_on_small_maps_only():
    def uses_conv(hw):
        x = jnp.zeros((1, *hw, 4), jnp.float32)
        conv = vgg.Conv3x3(4)
        params = jax.eval_shape(conv.init, jax.random.key(0), x)
        return "conv_general_dilated" in str(jax.make_jaxpr(conv.apply)(params, x))

    assert not uses_conv((2, 2)) and not uses_conv((1, 4))
    assert uses_conv((4, 4)) and uses_conv((3, 2))


def test_vgg_fast_path_equals_plain_conv():
    fast = models.TinyVGG11(num_classes=10)
    plain = models.TinyVGG11(num_classes=10, im2col_max_pixels=0)
    images = jax.random.uniform(jax.random.key(1), (2, 32, 32, 3), jnp.float32)
    variables = perturb_batch_stats(models.init_variables(fast, INIT_KEY, (1, 32, 32, 3)))
    got = models.capture_activations(fast, variables, images, vgg.LAYERS)
    expected = models.capture_activations(plain, variables, images, vgg.LAYERS)
    for layer in vgg.LAYERS:
        np.testing.assert_allclose(got[layer], expected[layer], rtol=1e-5, atol=1e-6, err_msg=layer)
