"""Tests for experiments.data: shapes, digits, CIFAR (through tfds mock data), probe subsets."""
import numpy as np
import pytest
import sklearn.datasets
import tensorflow_datasets as tfds
from tensorflow_datasets.testing import mocking

from conftest import unbound_getitems

from experiments import data

# ----------------------------------------------------------------------------------------------
# shapes


@pytest.fixture(scope="module")
def shapes():
    return data.make_shapes(600, seed=3)


def _saturation(images):
    """(N, H, W): max - min over RGB; zero exactly on the grey background."""
    return images.max(-1) - images.min(-1)


def test_shapes_arrays(shapes):
    assert shapes.images.shape == (600, 32, 32, 3) and shapes.images.dtype == np.float32
    assert 0.0 <= shapes.images.min() and shapes.images.max() <= 1.0
    assert shapes.class_names == data.SHAPES_ATTRIBUTE_NAMES["shape"]
    assert set(shapes.attributes) == set(data.SHAPES_ATTRIBUTE_NAMES)
    np.testing.assert_array_equal(shapes.labels, shapes.attributes["shape"])
    np.testing.assert_array_equal(shapes.superlabels, data.SHAPES_SUPERCLASS[shapes.labels])
    assert shapes.superclass_names == ("curved", "straight")
    for key, names in data.SHAPES_ATTRIBUTE_NAMES.items():
        values = shapes.attributes[key]
        assert values.dtype == np.int64 and values.min() >= 0 and values.max() < len(names)
        assert np.unique(values).shape[0] == len(names), key  # every value is drawn
    counts = np.bincount(shapes.labels, minlength=6)
    assert counts.max() - counts.min() <= 1


def test_shapes_deterministic_per_seed_and_split(shapes):
    again = data.make_shapes(600, seed=3)
    np.testing.assert_array_equal(again.images, shapes.images)
    for key in shapes.attributes:
        np.testing.assert_array_equal(again.attributes[key], shapes.attributes[key])
    other_seed = data.make_shapes(600, seed=4)
    other_split = data.make_shapes(600, seed=3, split="test")
    assert not np.array_equal(other_seed.images, shapes.images)
    assert not np.array_equal(other_split.images, shapes.images)
    assert not np.array_equal(other_seed.attributes["colour"], shapes.attributes["colour"])


def test_shapes_colour_and_position_match_rendering(shapes):
    sat = _saturation(shapes.images)
    for i in range(len(shapes)):
        # The most saturated pixel is fully covered by the shape: exactly its colour.
        row, col = np.unravel_index(np.argmax(sat[i]), sat[i].shape)
        colour = data._SHAPES_RGB[shapes.attributes["colour"][i]]
        np.testing.assert_allclose(shapes.images[i, row, col], colour, atol=1e-6)
        # Every shape pixel lies in the quadrant of the position attribute.
        rows, cols = np.nonzero(sat[i] > 0)
        top, left = divmod(shapes.attributes["position"][i], 2)
        assert np.all(rows // 16 == top) and np.all(cols // 16 == left), i


def test_shapes_size_orders_area(shapes):
    sat = _saturation(shapes.images)
    area = (sat / sat.max(axis=(1, 2), keepdims=True)).sum(axis=(1, 2))
    for shape in range(6):
        means = [area[(shapes.labels == shape) & (shapes.attributes["size"] == size)].mean()
                 for size in range(3)]
        assert means[0] < means[1] < means[2], (shape, means)


def _texture_of(patch):
    """Classifies a grey (16, 16) background patch as plain, stripes, checker or noise."""
    if np.unique(patch).shape[0] == 1:
        return "plain"
    if np.unique(patch).shape[0] > 2:
        return "noise"
    rows_constant = all(np.unique(row).shape[0] == 1 for row in patch)
    return "stripes" if rows_constant else "checker"


def test_shapes_background_texture_matches_rendering(shapes):
    names = data.SHAPES_ATTRIBUTE_NAMES["background"]
    for i in range(len(shapes)):
        top, left = divmod(shapes.attributes["position"][i], 2)
        # The diagonally opposite quadrant holds background only, and it is grey.
        patch = shapes.images[i, (1 - top) * 16:(2 - top) * 16, (1 - left) * 16:(2 - left) * 16]
        np.testing.assert_array_equal(patch[..., 0], patch[..., 1])
        np.testing.assert_array_equal(patch[..., 0], patch[..., 2])
        assert _texture_of(patch[..., 0]) == names[shapes.attributes["background"][i]], i


def test_shapes_restrict():
    restricted = data.make_shapes(
        200, seed=0, restrict={"colour": ["red", "cyan"], "shape": [1, 4], "background": [3]})
    assert set(np.unique(restricted.attributes["colour"])) == {0, 5}
    assert set(np.unique(restricted.labels)) == {1, 4}
    assert set(np.unique(restricted.attributes["background"])) == {3}
    assert np.bincount(restricted.labels)[[1, 4]].tolist() == [100, 100]
    assert restricted.class_names == data.SHAPES_ATTRIBUTE_NAMES["shape"]  # the full label space
    assert np.unique(restricted.attributes["size"]).shape[0] == 3


@pytest.mark.parametrize("restrict, fault", [
    ({"hue": [0]}, "unknown attributes"),
    ({"colour": ["purple"]}, "unknown value"),
    ({"colour": [6]}, "an index in"),
    ({"colour": [1.0]}, "an index in"),
    ({"colour": []}, "at least one"),
    ({"colour": [0, "red"]}, "distinct"),
])
def test_shapes_restrict_errors(restrict, fault):
    with pytest.raises(ValueError, match=fault):
        data.make_shapes(10, restrict=restrict)


def test_shapes_argument_errors():
    with pytest.raises(ValueError, match="n: "):
        data.make_shapes(0)
    with pytest.raises(ValueError, match="split: "):
        data.make_shapes(10, split="validation")
    with pytest.raises(ValueError, match="name: "):
        data.load_dataset("mnist")


# ----------------------------------------------------------------------------------------------
# digits


def test_digits_offline_split_and_resize():
    train, test = data.load_digits("train"), data.load_digits("test")
    assert train.images.shape == (1437, 32, 32, 1) and test.images.shape == (360, 32, 32, 1)
    assert train.images.dtype == np.float32
    assert 0.0 <= train.images.min() <= train.images.max() <= 1.0
    assert train.class_names == tuple("0123456789") and train.superlabels is None
    assert np.bincount(test.labels).min() >= 35  # stratified: 36 per class
    np.testing.assert_array_equal(data.load_dataset("digits", "test").images, test.images)
    assert not np.array_equal(data.load_digits("test", seed=1).labels, test.labels)

    # Each test image is an original upsampled bilinearly (half-pixel centres, edges clamped),
    # as np.interp computes it separably. Find each one among the originals by its 4x4-cell means
    # (nearly, not exactly, the 8x8 original), then compare exactly and check its label.
    original = sklearn.datasets.load_digits()
    at = (np.arange(32) + 0.5) / 4.0 - 0.5
    upsample = lambda v: np.interp(at, np.arange(8), v)
    expected = np.apply_along_axis(
        upsample, 2, np.apply_along_axis(upsample, 1, original.images / 16.0))
    cells = test.images[..., 0].reshape(-1, 8, 4, 8, 4).mean(axis=(2, 4)).reshape(-1, 64)
    candidates = expected.reshape(-1, 8, 4, 8, 4).mean(axis=(2, 4)).reshape(-1, 64)
    match = (((cells[:, None, :] - candidates[None, :, :]) ** 2).sum(-1)).argmin(axis=1)
    np.testing.assert_allclose(test.images[..., 0], expected[match], atol=1e-6)
    np.testing.assert_array_equal(original.target[match], test.labels)


# ----------------------------------------------------------------------------------------------
# CIFAR through tfds mock data (random images and labels; no TensorFlow, no download)


def test_cifar100_names_and_mapping():
    assert len(data.CIFAR100_FINE_NAMES) == 100 == len(set(data.CIFAR100_FINE_NAMES))
    assert len(data.CIFAR100_COARSE_NAMES) == 20
    assert list(data.CIFAR100_FINE_NAMES) == sorted(data.CIFAR100_FINE_NAMES)
    assert data.CIFAR100_FINE_TO_COARSE.shape == (100,)
    assert np.bincount(data.CIFAR100_FINE_TO_COARSE).tolist() == [5] * 20
    named = dict(zip(data.CIFAR100_FINE_NAMES, data.CIFAR100_FINE_TO_COARSE))
    coarse = data.CIFAR100_COARSE_NAMES
    assert coarse[named["apple"]] == "fruit_and_vegetables"
    assert coarse[named["whale"]] == "aquatic_mammals"
    assert coarse[named["lawn_mower"]] == "vehicles_2"
    assert coarse[named["woman"]] == "people"
    assert data.CIFAR100_FINE_NAMES[0] == "apple" and data.CIFAR100_FINE_NAMES[-1] == "worm"


@pytest.fixture
def mock_cifar(mock_cifar_data, monkeypatch):
    """tfds mock data whose CIFAR-100 coarse labels follow the real fine-to-coarse mapping."""
    monkeypatch.setattr(data, "_CIFAR_READ_BATCH", 7)  # several batches, the last one partial
    with mock_cifar_data(17):
        yield


@pytest.mark.parametrize("name, n_classes, n_super", [("cifar100", 100, 20), ("cifar10", 10, 2)])
def test_cifar_mock(mock_cifar, tmp_path, name, n_classes, n_super):
    ds = data.load_dataset(name, "test", data_dir=str(tmp_path), progress=False)
    assert (ds.name, ds.split, len(ds)) == (name, "test", 17)
    assert ds.images.shape == (17, 32, 32, 3) and ds.images.dtype == np.float32
    assert 0.0 <= ds.images.min() and ds.images.max() <= 1.0
    assert ds.labels.dtype == np.int64 and 0 <= ds.labels.min() and ds.labels.max() < n_classes
    assert len(ds.class_names) == n_classes and len(ds.superclass_names) == n_super
    assert ds.attributes == {}
    mapping = data.CIFAR100_FINE_TO_COARSE if name == "cifar100" else data.CIFAR10_SUPERCLASS
    np.testing.assert_array_equal(ds.superlabels, mapping[ds.labels])
    # Batched reading returns the records in order: compare with one-by-one reads.
    source = tfds.data_source(name, split="test", data_dir=str(tmp_path), download=False)
    for i in (0, 6, 7, 16):
        np.testing.assert_array_equal(ds.images[i] * 255.0, source[i]["image"])
        assert ds.labels[i] == source[i]["label"]


def test_cifar100_mapping_disagreement_raises(monkeypatch, tmp_path):
    monkeypatch.setattr(mocking, "_getitems", unbound_getitems)  # random coarse labels
    with tfds.testing.mock_data(num_examples=12):
        with pytest.raises(ValueError, match="disagree with CIFAR100_FINE_TO_COARSE"):
            data.load_cifar("cifar100", "test", data_dir=str(tmp_path), progress=False)


@pytest.mark.parametrize("download", [False, True])
def test_cifar_not_prepared_says_what_to_run(monkeypatch, tmp_path, download):
    monkeypatch.setattr(data, "_has_tensorflow", lambda: False)  # never download in tests
    with pytest.raises(RuntimeError, match=r"pip install -e '\.\[cifar\]'") as info:
        data.load_cifar("cifar10", "train", data_dir=str(tmp_path), download=download)
    assert "load_cifar('cifar10'" in str(info.value) and str(tmp_path) in str(info.value)


def test_cifar_argument_errors():
    with pytest.raises(ValueError, match="name: "):
        data.load_cifar("cifar1000")
    with pytest.raises(ValueError, match="split: "):
        data.load_cifar("cifar10", "valid")


# ----------------------------------------------------------------------------------------------
# probe subsets and Dataset


def test_probe_indices_balanced_sorted_and_seeded():
    labels = np.repeat(np.arange(4), [50, 30, 40, 20])
    idx = data.probe_indices(labels, 42, seed=0)
    assert idx.shape == (42,) and idx.dtype == np.int64
    assert np.all(np.diff(idx) > 0)  # ascending, no repeats
    counts = np.bincount(labels[idx], minlength=4)
    assert counts.sum() == 42 and counts.max() - counts.min() == 1
    np.testing.assert_array_equal(idx, data.probe_indices(labels, 42, seed=0))
    assert not np.array_equal(idx, data.probe_indices(labels, 42, seed=1))


def test_probe_indices_errors():
    labels = np.repeat(np.arange(3), [10, 10, 2])
    with pytest.raises(ValueError, match="class 2 has 2 examples"):
        data.probe_indices(labels, 9)
    with pytest.raises(ValueError, match="n: expected 1 <= n <= 22"):
        data.probe_indices(labels, 23)
    with pytest.raises(ValueError, match="labels: "):
        data.probe_indices(labels[None], 3)


def test_subset_keeps_everything_aligned(shapes):
    idx = data.probe_indices(shapes.labels, 60, seed=0)
    sub = shapes.subset(idx)
    assert len(sub) == 60 and sub.split == shapes.split
    np.testing.assert_array_equal(sub.images, shapes.images[idx])
    np.testing.assert_array_equal(sub.superlabels, shapes.superlabels[idx])
    for key in shapes.attributes:
        np.testing.assert_array_equal(sub.attributes[key], shapes.attributes[key][idx])
    assert np.bincount(sub.labels).tolist() == [10] * 6


def test_dataset_validates_shapes():
    images = np.zeros((4, 32, 32, 1), np.float32)
    with pytest.raises(ValueError, match="labels: expected shape"):
        data.Dataset("x", "train", images, np.zeros(3, np.int64), ("a",))
    with pytest.raises(ValueError, match="images: expected float32"):
        data.Dataset("x", "train", images.astype(np.uint8), np.zeros(4, np.int64), ("a",))
    with pytest.raises(ValueError, match="attributes\\['k'\\]"):
        data.Dataset("x", "train", images, np.zeros(4, np.int64), ("a",),
                     attributes={"k": np.zeros(5, np.int64)}, attribute_names={"k": ("v",)})
