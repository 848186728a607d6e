"""Tests for experiments.matrices.build_blocks, with small stand-in activation functions."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from experiments.matrices import build_blocks

N, H, W = 10, 4, 6  # 10 probe images of 4x6 pixels


def _images(channels=3, n=N, seed=0):
    return np.random.default_rng(seed).uniform(0.0, 1.0, (n, H, W, channels)).astype(np.float32)


def _index_encoder(traces=None):
    """A jitted stand-in whose activations encode their own position.

    "grid" (B, 2, 3, 4): value at (b, h, w, c) = (c*2*3 + h*3 + w) + s_b, and "vector" (B, 5):
    value at (b, c) = c + s_b, where s_b is the sum of image b. Block row r, column n must then
    hold r + s_n exactly when rows are channel-major.
    """

    def fn(x):
        if traces is not None:
            traces.append(x.shape)
        s = x.sum(axis=(1, 2, 3))
        grid = jnp.arange(2 * 3 * 4, dtype=jnp.float32).reshape(4, 2, 3).transpose(1, 2, 0)
        return {"grid": grid[None] + s[:, None, None, None],
                "vector": jnp.arange(5, dtype=jnp.float32)[None, :] + s[:, None]}

    return jax.jit(fn)


def _conv_relu():
    """A jitted stand-in network: fixed random 3x3 conv (stride 2) + ReLU, then a global mean."""
    kernel = jax.random.normal(jax.random.key(0), (3, 3, 3, 8), dtype=jnp.float32)

    @jax.jit
    def fn(x):
        y = jax.lax.conv_general_dilated(
            x, kernel, window_strides=(2, 2), padding="SAME",
            dimension_numbers=("NHWC", "HWIO", "NHWC"))
        y = jax.nn.relu(y)
        return {"conv": y, "pool": y.mean(axis=(1, 2))}

    return fn


def test_block_order_shapes_and_channel_major_rows():
    images = _images()
    blocks = build_blocks(images, _index_encoder(), ["grid", "vector"], batch_size=4,
                          progress=False)
    assert list(blocks) == ["pixels_r", "pixels_g", "pixels_b", "grid", "vector"]
    sums = images.sum(axis=(1, 2, 3))
    assert blocks["grid"].shape == (24, N) and blocks["vector"].shape == (5, N)
    for name, rows in (("grid", 24), ("vector", 5)):
        assert blocks[name].dtype == np.float32
        expected = np.arange(rows)[:, None] + sums[None, :]
        np.testing.assert_allclose(blocks[name], expected, rtol=1e-6)


def test_pixel_rows_are_row_major_per_channel():
    images = _images()
    blocks = build_blocks(images, _index_encoder(), ["vector"], batch_size=3, progress=False)
    for c, name in enumerate(["pixels_r", "pixels_g", "pixels_b"]):
        assert blocks[name].shape == (H * W, N) and blocks[name].dtype == np.float32
        for n in (0, 4, 9):
            for h, w in ((0, 0), (1, 5), (3, 2)):
                assert blocks[name][h * W + w, n] == images[n, h, w, c]


def test_one_channel_is_named_pixels():
    images = _images(channels=1)
    blocks = build_blocks(images, _index_encoder(), ["vector"], progress=False)
    assert list(blocks) == ["pixels", "vector"]
    np.testing.assert_array_equal(blocks["pixels"], images.reshape(N, H * W).T)


def test_last_partial_batch_without_retracing():
    traces_full, traces_partial = [], []
    build_blocks(_images(n=8), _index_encoder(traces_full), ["grid"], batch_size=4, progress=False)
    images = _images(n=N)  # batches of 4, 4 and 2
    blocks = build_blocks(images, _index_encoder(traces_partial), ["grid"], batch_size=4,
                          progress=False)
    assert traces_partial == traces_full and set(traces_partial) == {(4, H, W, 3)}
    whole = build_blocks(images, _index_encoder(), ["grid"], batch_size=64, progress=False)
    for name in blocks:
        np.testing.assert_array_equal(blocks[name], whole[name])


def test_avg_layer_is_the_spatial_mean():
    images = _images()
    fn = _conv_relu()
    blocks = build_blocks(images, fn, ["conv", "conv:avg", "pool"], batch_size=4, progress=False)
    conv = np.asarray(fn(jnp.asarray(images))["conv"])  # (N, 2, 3, 8)
    assert blocks["conv"].shape == (8 * 2 * 3, N) and blocks["conv:avg"].shape == (8, N)
    np.testing.assert_allclose(blocks["conv"], conv.transpose(3, 1, 2, 0).reshape(-1, N),
                               rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(blocks["conv:avg"], conv.mean(axis=(1, 2)).T, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(blocks["conv:avg"], blocks["pool"], rtol=1e-5, atol=1e-6)
    assert blocks["conv"].min() >= 0.0 and blocks["conv"].max() > 0.0


def test_memmap_path_equals_in_memory(tmp_path, capsys):
    images = _images()
    layers = ["conv", "conv:avg", "pool"]
    in_memory = build_blocks(images, _conv_relu(), layers, batch_size=4, progress=False)
    on_disk = build_blocks(images, _conv_relu(), layers, batch_size=4, memory_budget_bytes=1024,
                           out_dir=tmp_path / "blocks", progress=True)
    assert "memory-mapped" in capsys.readouterr().out
    assert list(on_disk) == list(in_memory)
    for name, block in on_disk.items():
        assert isinstance(block, np.memmap) and block.dtype == np.float32
        np.testing.assert_array_equal(block, in_memory[name])
        assert not isinstance(in_memory[name], np.memmap)
    saved = np.load(tmp_path / "blocks" / "conv-avg.npy")
    np.testing.assert_array_equal(saved, in_memory["conv:avg"])
    assert sorted(p.name for p in (tmp_path / "blocks").iterdir()) == [
        "conv-avg.npy", "conv.npy", "pixels_b.npy", "pixels_g.npy", "pixels_r.npy", "pool.npy"]


def test_prints_memory_estimate_before_building(capsys):
    build_blocks(_images(), _index_encoder(), ["grid", "vector"], progress=True)
    out = capsys.readouterr().out
    # 3 * 24 + 24 + 5 = 101 rows of 10 float32 columns.
    assert "5 blocks for 10 images, 3.9 KiB in memory" in out
    assert "grid" in out and "(24, 10)" in out


def test_over_budget_without_out_dir_raises():
    with pytest.raises(ValueError, match="memory_budget_bytes: the blocks need 3.9 KiB"):
        build_blocks(_images(), _index_encoder(), ["grid", "vector"], memory_budget_bytes=100,
                     progress=False)


@pytest.mark.parametrize("layers, fault", [
    (["grid:max"], "bad spec 'grid:max'"),
    ([":avg"], "bad spec ':avg'"),
    (["grid", "grid"], "given twice"),
    ([], "non-empty list"),
    ("grid", "non-empty list"),
    (["stage9"], "'stage9' names a layer activation_fn does not return"),
    (["vector:avg"], "averages over H and W"),
])
def test_bad_layer_specs(layers, fault):
    with pytest.raises(ValueError, match=fault):
        build_blocks(_images(), _index_encoder(), layers, progress=False)


def test_bad_inputs():
    fn = _index_encoder()
    with pytest.raises(ValueError, match=r"images: values must lie in \[0, 1\]"):
        build_blocks(_images() * 2.0, fn, ["grid"], progress=False)
    with pytest.raises(ValueError, match="images: expected \\(N, H, W, C\\)"):
        build_blocks(_images()[0], fn, ["grid"], progress=False)
    with pytest.raises(ValueError, match="batch_size"):
        build_blocks(_images(), fn, ["grid"], batch_size=0, progress=False)
    negative = jax.jit(lambda x: {"logits": x.mean(axis=(1, 2)) - 1.0})
    with pytest.raises(ValueError, match="layer 'logits' has negative values"):
        build_blocks(_images(), negative, ["logits"], progress=False)
    rank3 = jax.jit(lambda x: {"tokens": x.reshape(x.shape[0], H * W, 3)})
    with pytest.raises(ValueError, match="layer 'tokens' has shape"):
        build_blocks(_images(), rank3, ["tokens"], progress=False)
