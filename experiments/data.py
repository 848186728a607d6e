"""Datasets for training the analysed networks and for probing them.

Every loader returns a :class:`Dataset` for one split, ``"train"`` or ``"test"``:

- ``shapes`` (:func:`make_shapes`): procedural, seeded 32x32 RGB images of a coloured shape on a
  grey textured background, with the generative attributes of every image as ground truth.
- ``digits`` (:func:`load_digits`): scikit-learn's 8x8 handwritten digits (shipped with
  scikit-learn, no download), resized to 32x32, one channel.
- ``cifar10`` and ``cifar100`` (:func:`load_cifar`): read with ``tfds.data_source`` from
  ArrayRecord files. Preparing them once needs TensorFlow and internet
  (``pip install -e '.[cifar]'``); reading prepared files needs neither.

Images are float32 in [0, 1], NHWC, ``(N, 32, 32, C)``: what the models take and what the pixel
blocks of the factorisation hold. Nothing is mean/std normalised.

Example::

    train = load_dataset("shapes", "train", n=6000, seed=0)
    probe = load_dataset("shapes", "test", n=2000, seed=0)
    probe = probe.subset(probe_indices(probe.labels, 600, seed=0))
"""
from __future__ import annotations

import dataclasses
import importlib.util
from collections.abc import Mapping, Sequence

import jax
import numpy as np
import sklearn.datasets
import sklearn.model_selection
import tensorflow_datasets as tfds
import tqdm

SPLITS = ("train", "test")

# ----------------------------------------------------------------------------------------------
# Dataset


@dataclasses.dataclass(frozen=True, eq=False)
class Dataset:
    """One split of a labelled image dataset.

    Attributes:
      name: the dataset's name, e.g. ``"shapes"``.
      split: ``"train"`` or ``"test"``.
      images: ``(N, 32, 32, C)`` float32 in [0, 1], NHWC.
      labels: ``(N,)`` int64 class indices into ``class_names``.
      class_names: ``(K,)`` human-readable class names.
      superlabels: ``(N,)`` int64 superclass indices into ``superclass_names``, or None.
      superclass_names: superclass names, or None when ``superlabels`` is None.
      attributes: ground-truth attributes, ``{attribute: (N,) int64 value indices}``; may be empty.
      attribute_names: ``{attribute: value names}``, the same keys as ``attributes``.
    """

    name: str
    split: str
    images: np.ndarray
    labels: np.ndarray
    class_names: tuple[str, ...]
    superlabels: np.ndarray | None = None
    superclass_names: tuple[str, ...] | None = None
    attributes: Mapping[str, np.ndarray] = dataclasses.field(default_factory=dict)
    attribute_names: Mapping[str, tuple[str, ...]] = dataclasses.field(default_factory=dict)

    def __post_init__(self):
        n = self.images.shape[0]
        if self.images.ndim != 4 or self.images.dtype != np.float32:
            raise ValueError(
                f"images: expected float32 (N, H, W, C), got {self.images.dtype} "
                f"{self.images.shape}")
        if self.labels.shape != (n,):
            raise ValueError(f"labels: expected shape ({n},), got {self.labels.shape}")
        if (self.superlabels is None) != (self.superclass_names is None):
            raise ValueError("superlabels and superclass_names must be given together")
        if self.superlabels is not None and self.superlabels.shape != (n,):
            raise ValueError(f"superlabels: expected shape ({n},), got {self.superlabels.shape}")
        if set(self.attributes) != set(self.attribute_names):
            raise ValueError("attributes and attribute_names must have the same keys")
        for key, values in self.attributes.items():
            if values.shape != (n,):
                raise ValueError(f"attributes[{key!r}]: expected shape ({n},), got {values.shape}")

    def __len__(self) -> int:
        return self.images.shape[0]

    def subset(self, indices: np.ndarray) -> Dataset:
        """The examples at ``indices`` (``(M,)`` int), in that order, as a new Dataset."""
        indices = np.asarray(indices)
        return dataclasses.replace(
            self,
            images=self.images[indices],
            labels=self.labels[indices],
            superlabels=None if self.superlabels is None else self.superlabels[indices],
            attributes={key: values[indices] for key, values in self.attributes.items()},
        )


def load_dataset(name: str, split: str = "train", **kwargs) -> Dataset:
    """Loads one split of a dataset by name.

    Args:
      name: ``"shapes"``, ``"digits"``, ``"cifar10"`` or ``"cifar100"``.
      split: ``"train"`` or ``"test"``.
      **kwargs: passed on to :func:`make_shapes` (``n``, ``seed``, ``restrict``),
        :func:`load_digits` (``seed``, ``test_fraction``) or :func:`load_cifar`
        (``data_dir``, ``download``, ``progress``).
    """
    if name == "shapes":
        return make_shapes(split=split, **kwargs)
    if name == "digits":
        return load_digits(split, **kwargs)
    if name in _CIFAR_CLASS_NAMES:
        return load_cifar(name, split, **kwargs)
    raise ValueError(
        f"name: unknown dataset {name!r}; expected one of "
        f"{('shapes', 'digits', *_CIFAR_CLASS_NAMES)}")


def probe_indices(labels: np.ndarray, n: int, seed: int = 0) -> np.ndarray:
    """Indices of a class-balanced random subset of ``n`` examples.

    Each of the K classes present in ``labels`` gets ``n // K`` examples, and ``n % K`` classes
    drawn at random get one more. The indices are returned in ascending (dataset) order, so that
    the order of a probe set carries no label information.

    Args:
      labels: ``(N,)`` int class labels.
      n: size of the subset, ``1 <= n <= N``.
      seed: seed of the draw.

    Returns:
      ``(n,)`` int64 indices into ``labels``, sorted ascending, without repeats.
    """
    labels = np.asarray(labels)
    if labels.ndim != 1:
        raise ValueError(f"labels: expected shape (N,), got {labels.shape}")
    if not 1 <= n <= labels.shape[0]:
        raise ValueError(f"n: expected 1 <= n <= {labels.shape[0]} (the number of labels), got {n}")
    rng = np.random.default_rng(seed)
    classes = np.unique(labels)
    per_class = np.full(classes.shape[0], n // classes.shape[0])
    per_class[rng.choice(classes.shape[0], n % classes.shape[0], replace=False)] += 1
    chosen = []
    for cls, count in zip(classes, per_class):
        members = np.flatnonzero(labels == cls)
        if members.shape[0] < count:
            raise ValueError(
                f"n: class {cls} has {members.shape[0]} examples, fewer than the {count} "
                f"a balanced subset of {n} needs")
        chosen.append(rng.choice(members, count, replace=False))
    return np.sort(np.concatenate(chosen)).astype(np.int64)


def _check_split(split: str) -> None:
    if split not in SPLITS:
        raise ValueError(f"split: expected one of {SPLITS}, got {split!r}")


# ----------------------------------------------------------------------------------------------
# shapes
#
# Rendering: every shape is a signed distance function d(pixel centre) in pixels; its coverage
# of a pixel is clip(0.5 - d, 0, 1) (one-pixel-wide anti-aliased edge), and the image is
# background * (1 - coverage) + colour * coverage. Backgrounds are grey (r = g = b), shape
# colours are saturated, so colour and background never share a pixel value.

SHAPES_ATTRIBUTE_NAMES: dict[str, tuple[str, ...]] = {
    "shape": ("circle", "ring", "crescent", "square", "triangle", "cross"),
    "colour": ("red", "green", "blue", "yellow", "magenta", "cyan"),
    "position": ("top_left", "top_right", "bottom_left", "bottom_right"),
    "size": ("small", "medium", "large"),
    "background": ("plain", "stripes", "checker", "noise"),
}
SHAPES_SUPERCLASS_NAMES = ("curved", "straight")
# Superclass of each shape: circle, ring, crescent are curved; square, triangle, cross straight.
SHAPES_SUPERCLASS = np.array([0, 0, 0, 1, 1, 1], dtype=np.int64)

_SHAPES_RGB = np.array(
    [[0.90, 0.10, 0.10], [0.10, 0.75, 0.20], [0.15, 0.30, 1.00],
     [0.95, 0.85, 0.10], [0.85, 0.15, 0.85], [0.10, 0.85, 0.90]], dtype=np.float32)
_QUADRANT_CENTRES = np.array([[8.0, 8.0], [8.0, 24.0], [24.0, 8.0], [24.0, 24.0]])  # (row, col)
_RADII = np.array([3.5, 5.0, 6.5])  # nominal radius of each size, in pixels
_CENTRE_JITTER = 1.0  # uniform +- pixels around the quadrant centre
_RADIUS_JITTER = 0.25  # uniform +- pixels around the nominal radius
_SIDE = 32
_RENDER_CHUNK = 2048


def make_shapes(n: int, *, seed: int = 0, split: str = "train",
                restrict: Mapping[str, Sequence[int | str]] | None = None) -> Dataset:
    """Procedural 32x32 RGB images of one coloured shape on a grey textured background.

    Generative attributes (``SHAPES_ATTRIBUTE_NAMES``), one value per image:

    - ``shape`` (the class label): circle, ring, crescent, square, triangle, cross. The classes
      are balanced: counts differ by at most one.
    - ``colour``: the shape's fill, one of six saturated colours.
    - ``position``: the quadrant holding the shape's centre (jittered by +-1 px); the shape stays
      inside its quadrant.
    - ``size``: nominal radius 3.5, 5 or 6.5 px (jittered by +-0.25 px).
    - ``background``: grey ``plain`` (one level), ``stripes`` (horizontal, 2 px per stripe),
      ``checker`` (4 px cells) or ``noise`` (i.i.d. per pixel), with random grey levels and phase.

    Colour, position, size and background are drawn uniformly and independently of the shape,
    so they are not part of the class label. The superclass is the shape family
    (``SHAPES_SUPERCLASS``): curved (circle, ring, crescent) or straight-edged (square, triangle,
    cross).

    Args:
      n: number of images.
      seed: seed; ``split`` selects an independent stream, so a train and a test set drawn with
        the same seed share no draws.
      split: ``"train"`` or ``"test"``.
      restrict: optional ``{attribute: allowed values}`` (value names or indices) to draw from a
        part of the attribute space, e.g. ``{"colour": ["red", "green"]}``. Labels and value
        indices keep their meaning in the full space, so a model trained on a restricted set can
        be probed with an unrestricted one.

    Returns:
      A Dataset with images ``(n, 32, 32, 3)`` float32 in [0, 1] and every attribute.
    """
    _check_split(split)
    if n < 1:
        raise ValueError(f"n: expected a positive number of images, got {n}")
    allowed = _allowed_values(restrict or {})
    rng = np.random.default_rng([seed, SPLITS.index(split)])

    shapes = allowed["shape"][np.arange(n) % allowed["shape"].shape[0]]
    attributes = {"shape": rng.permutation(shapes)}
    for key in ("colour", "position", "size", "background"):
        attributes[key] = rng.choice(allowed[key], n)
    centres = (_QUADRANT_CENTRES[attributes["position"]]
               + rng.uniform(-_CENTRE_JITTER, _CENTRE_JITTER, (n, 2)))
    radii = _RADII[attributes["size"]] + rng.uniform(-_RADIUS_JITTER, _RADIUS_JITTER, n)
    levels = np.sort(rng.uniform(0.05, 0.95, (n, 2)), axis=1)  # (dark, light) grey levels
    phases = rng.integers(0, 4, (n, 2))  # (row, col) phase of stripes and checker

    images = np.empty((n, _SIDE, _SIDE, 3), dtype=np.float32)
    for start in range(0, n, _RENDER_CHUNK):
        part = slice(start, start + _RENDER_CHUNK)
        background = _background(attributes["background"][part], levels[part], phases[part], rng)
        cover = _coverage(attributes["shape"][part], centres[part], radii[part])[..., None]
        colour = _SHAPES_RGB[attributes["colour"][part]][:, None, None, :]
        images[part] = background[..., None] * (1.0 - cover) + colour * cover

    return Dataset(
        name="shapes", split=split, images=images, labels=attributes["shape"],
        class_names=SHAPES_ATTRIBUTE_NAMES["shape"],
        superlabels=SHAPES_SUPERCLASS[attributes["shape"]],
        superclass_names=SHAPES_SUPERCLASS_NAMES,
        attributes=attributes, attribute_names=dict(SHAPES_ATTRIBUTE_NAMES))


def _allowed_values(restrict: Mapping[str, Sequence[int | str]]) -> dict[str, np.ndarray]:
    """``{attribute: int64 array of allowed value indices}`` for every attribute."""
    unknown = set(restrict) - set(SHAPES_ATTRIBUTE_NAMES)
    if unknown:
        raise ValueError(
            f"restrict: unknown attributes {sorted(unknown)}; expected some of "
            f"{tuple(SHAPES_ATTRIBUTE_NAMES)}")
    allowed = {}
    for key, names in SHAPES_ATTRIBUTE_NAMES.items():
        if key not in restrict:
            allowed[key] = np.arange(len(names), dtype=np.int64)
            continue
        indices = []
        for value in restrict[key]:
            if isinstance(value, str):
                if value not in names:
                    raise ValueError(
                        f"restrict[{key!r}]: unknown value {value!r}; expected one of {names}")
                value = names.index(value)
            elif not (isinstance(value, (int, np.integer)) and 0 <= value < len(names)):
                raise ValueError(
                    f"restrict[{key!r}]: expected a value name or an index in [0, {len(names)}), "
                    f"got {value!r}")
            indices.append(int(value))
        if not indices or len(set(indices)) != len(indices):
            raise ValueError(
                f"restrict[{key!r}]: expected distinct values, at least one, got {restrict[key]!r}")
        allowed[key] = np.array(sorted(indices), dtype=np.int64)
    return allowed


def _background(texture: np.ndarray, levels: np.ndarray, phases: np.ndarray,
                rng: np.random.Generator) -> np.ndarray:
    """Grey backgrounds ``(n, 32, 32)`` float32.

    ``texture`` ``(n,)`` background indices, ``levels`` ``(n, 2)`` (dark, light) grey levels,
    ``phases`` ``(n, 2)`` (row, col) pattern offsets; noise is drawn from ``rng``.
    """
    rows = np.arange(_SIDE)[None, :, None] + phases[:, 0, None, None]
    cols = np.arange(_SIDE)[None, None, :] + phases[:, 1, None, None]
    stripes = (rows // 2) % 2
    checker = (rows // 4 + cols // 4) % 2
    noise = rng.uniform(0.0, 1.0, (texture.shape[0], _SIDE, _SIDE))
    kind = texture[:, None, None]
    mix = np.select([kind == 0, kind == 1, kind == 2], [0.0, stripes, checker], noise)
    dark, light = levels[:, 0, None, None], levels[:, 1, None, None]
    return (dark + (light - dark) * mix).astype(np.float32)


def _coverage(shape: np.ndarray, centres: np.ndarray, radii: np.ndarray) -> np.ndarray:
    """Anti-aliased coverage ``(n, 32, 32)`` float32 in [0, 1] of shapes ``(n,)``.

    ``centres`` ``(n, 2)`` (row, col) and ``radii`` ``(n,)`` in pixels.
    """
    pixel = np.arange(_SIDE) + 0.5
    cover = np.empty((shape.shape[0], _SIDE, _SIDE), dtype=np.float32)
    for kind, sdf in enumerate(_SDFS):
        members = shape == kind
        if members.any():
            y = pixel[None, :, None] - centres[members, 0, None, None]  # rows, pointing down
            x = pixel[None, None, :] - centres[members, 1, None, None]
            distance = sdf(x, y, radii[members, None, None])
            cover[members] = np.clip(0.5 - distance, 0.0, 1.0)
    return cover


def _box(x, y, half_x, half_y):
    qx, qy = np.abs(x) - half_x, np.abs(y) - half_y
    outside = np.hypot(np.maximum(qx, 0.0), np.maximum(qy, 0.0))
    return outside + np.minimum(np.maximum(qx, qy), 0.0)


def _triangle(x, y, r):
    # Upward equilateral triangle of circumradius 1.15 r, its bounding box centred on the origin:
    # the largest distance to its three edge lines (exact along the edges, which is all the
    # anti-aliasing needs).
    big = 1.15 * r
    y = y - big / 4.0
    c, s = np.sqrt(3.0) / 2.0, 0.5
    return np.maximum(np.maximum(y, c * x - s * y), -c * x - s * y) - big / 2.0


# Signed distance (pixels, negative inside) of each shape, in SHAPES_ATTRIBUTE_NAMES order.
_SDFS = (
    lambda x, y, r: np.hypot(x, y) - r,
    lambda x, y, r: np.maximum(np.hypot(x, y) - r, 0.55 * r - np.hypot(x, y)),
    lambda x, y, r: np.maximum(np.hypot(x, y) - r, 0.8 * r - np.hypot(x - 0.5 * r, y)),
    lambda x, y, r: _box(x, y, 0.8 * r, 0.8 * r),
    _triangle,
    lambda x, y, r: np.minimum(_box(x, y, 0.9 * r, 0.3 * r), _box(x, y, 0.3 * r, 0.9 * r)),
)


# ----------------------------------------------------------------------------------------------
# digits


def load_digits(split: str = "train", *, seed: int = 0, test_fraction: float = 0.2) -> Dataset:
    """scikit-learn's handwritten digits (1,797 images, 10 classes), one channel, 32x32.

    The 8x8 images (values 0..16) are divided by 16 and resized to 32x32 with
    ``jax.image.resize(..., "linear")`` (bilinear, half-pixel centres, edges clamped), which keeps
    them in [0, 1]. The split is stratified by class and fixed by ``seed``. There is no
    superclass and no attribute.

    Args:
      split: ``"train"`` or ``"test"``.
      seed: seed of the train/test split.
      test_fraction: share of the images in the test split, in (0, 1).

    Returns:
      A Dataset with images ``(N, 32, 32, 1)`` float32 in [0, 1], class names ``"0"`` .. ``"9"``.
    """
    _check_split(split)
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test_fraction: expected a value in (0, 1), got {test_fraction}")
    digits = sklearn.datasets.load_digits()
    train, test = sklearn.model_selection.train_test_split(
        np.arange(digits.target.shape[0]), test_size=test_fraction, random_state=seed,
        stratify=digits.target)
    indices = np.sort(train if split == "train" else test)
    small = (digits.images[indices] / 16.0).astype(np.float32)[..., None]
    images = jax.image.resize(small, (indices.shape[0], _SIDE, _SIDE, 1), "linear")
    return Dataset(
        name="digits", split=split, images=np.asarray(images, dtype=np.float32),
        labels=digits.target[indices].astype(np.int64),
        class_names=tuple(str(d) for d in range(10)))


# ----------------------------------------------------------------------------------------------
# CIFAR

CIFAR10_NAMES = ("airplane", "automobile", "bird", "cat", "deer",
                 "dog", "frog", "horse", "ship", "truck")
CIFAR10_SUPERCLASS_NAMES = ("vehicle", "animal")
# Superclass of each CIFAR-10 class (not in the data): the four vehicles and the six animals.
CIFAR10_SUPERCLASS = np.array([0, 0, 1, 1, 1, 1, 1, 1, 0, 0], dtype=np.int64)

# The 20 CIFAR-100 superclasses in label order, each with its 5 classes.
_CIFAR100_GROUPS = {
    "aquatic_mammals": ("beaver", "dolphin", "otter", "seal", "whale"),
    "fish": ("aquarium_fish", "flatfish", "ray", "shark", "trout"),
    "flowers": ("orchid", "poppy", "rose", "sunflower", "tulip"),
    "food_containers": ("bottle", "bowl", "can", "cup", "plate"),
    "fruit_and_vegetables": ("apple", "mushroom", "orange", "pear", "sweet_pepper"),
    "household_electrical_devices": ("clock", "keyboard", "lamp", "telephone", "television"),
    "household_furniture": ("bed", "chair", "couch", "table", "wardrobe"),
    "insects": ("bee", "beetle", "butterfly", "caterpillar", "cockroach"),
    "large_carnivores": ("bear", "leopard", "lion", "tiger", "wolf"),
    "large_man-made_outdoor_things": ("bridge", "castle", "house", "road", "skyscraper"),
    "large_natural_outdoor_scenes": ("cloud", "forest", "mountain", "plain", "sea"),
    "large_omnivores_and_herbivores": ("camel", "cattle", "chimpanzee", "elephant", "kangaroo"),
    "medium_mammals": ("fox", "porcupine", "possum", "raccoon", "skunk"),
    "non-insect_invertebrates": ("crab", "lobster", "snail", "spider", "worm"),
    "people": ("baby", "boy", "girl", "man", "woman"),
    "reptiles": ("crocodile", "dinosaur", "lizard", "snake", "turtle"),
    "small_mammals": ("hamster", "mouse", "rabbit", "shrew", "squirrel"),
    "trees": ("maple_tree", "oak_tree", "palm_tree", "pine_tree", "willow_tree"),
    "vehicles_1": ("bicycle", "bus", "motorcycle", "pickup_truck", "train"),
    "vehicles_2": ("lawn_mower", "rocket", "streetcar", "tank", "tractor"),
}
CIFAR100_COARSE_NAMES = tuple(_CIFAR100_GROUPS)
# Fine label order: the class names sorted alphabetically, as in the dataset.
CIFAR100_FINE_NAMES = tuple(sorted(name for group in _CIFAR100_GROUPS.values() for name in group))
# (100,) int64: the coarse label of each fine label.
CIFAR100_FINE_TO_COARSE = np.array(
    [next(c for c, group in enumerate(_CIFAR100_GROUPS.values()) if fine in group)
     for fine in CIFAR100_FINE_NAMES], dtype=np.int64)

_CIFAR_CLASS_NAMES = {"cifar10": CIFAR10_NAMES, "cifar100": CIFAR100_FINE_NAMES}
_CIFAR_READ_BATCH = 4096  # records decoded per __getitems__ call


def load_cifar(name: str = "cifar100", split: str = "train", *, data_dir: str | None = None,
               download: bool = True, progress: bool = True) -> Dataset:
    """CIFAR-10 or CIFAR-100 through ``tfds.data_source`` (ArrayRecord, random access).

    CIFAR-100 has 100 fine classes (``labels``) and 20 coarse superclasses (``superlabels``,
    read from the data and checked against ``CIFAR100_FINE_TO_COARSE``). CIFAR-10's superclass
    (vehicle or animal, ``CIFAR10_SUPERCLASS``) is this project's grouping, not part of the data.

    The first call on a machine downloads and prepares the dataset into ``data_dir``, which needs
    TensorFlow (``pip install -e '.[cifar]'``) and internet; later calls only read the prepared
    files and need neither.

    Args:
      name: ``"cifar10"`` or ``"cifar100"``.
      split: ``"train"`` (50,000 images) or ``"test"`` (10,000).
      data_dir: tfds data directory; None for tfds's default (``$TFDS_DATA_DIR`` or
        ``~/tensorflow_datasets``).
      download: whether to download and prepare the dataset if it is not prepared yet (only
        attempted when TensorFlow is installed).
      progress: show a progress bar while decoding.

    Returns:
      A Dataset with images ``(N, 32, 32, 3)`` float32 in [0, 1] (uint8 / 255).

    Raises:
      DatasetUnavailable (a RuntimeError): the dataset is not prepared and cannot be prepared
        here; says what to run.
      ValueError: the data's coarse labels disagree with ``CIFAR100_FINE_TO_COARSE``.
    """
    if name not in _CIFAR_CLASS_NAMES:
        raise ValueError(f"name: expected 'cifar10' or 'cifar100', got {name!r}")
    _check_split(split)
    try:
        source = tfds.data_source(
            name, split=split, data_dir=data_dir, download=download and _has_tensorflow(),
            builder_kwargs={"file_format": "array_record"})
    except Exception as err:  # tfds raises many unrelated types here; the cause stays chained.
        raise DatasetUnavailable(_cifar_help(name, data_dir, err)) from err

    n = len(source)
    images = np.empty((n, _SIDE, _SIDE, 3), dtype=np.float32)
    fields = ("label", "coarse_label") if name == "cifar100" else ("label",)
    labels = {field: np.empty(n, dtype=np.int64) for field in fields}
    with tqdm.tqdm(total=n, desc=f"{name} {split}", unit="img", disable=not progress) as bar:
        for start in range(0, n, _CIFAR_READ_BATCH):
            stop = min(start + _CIFAR_READ_BATCH, n)
            records = source.__getitems__(list(range(start, stop)))
            images[start:stop] = np.stack([r["image"] for r in records]) / np.float32(255.0)
            for field in fields:
                labels[field][start:stop] = [r[field] for r in records]
            bar.update(stop - start)

    if name == "cifar10":
        superlabels = CIFAR10_SUPERCLASS[labels["label"]]
        superclass_names = CIFAR10_SUPERCLASS_NAMES
    else:
        superlabels, superclass_names = labels["coarse_label"], CIFAR100_COARSE_NAMES
        wrong = np.flatnonzero(CIFAR100_FINE_TO_COARSE[labels["label"]] != superlabels)
        if wrong.shape[0]:
            raise ValueError(
                f"{name} {split}: {wrong.shape[0]} of {n} coarse labels disagree with "
                f"CIFAR100_FINE_TO_COARSE (first at index {wrong[0]}: fine "
                f"{labels['label'][wrong[0]]}, coarse {superlabels[wrong[0]]})")
    return Dataset(
        name=name, split=split, images=images, labels=labels["label"],
        class_names=_CIFAR_CLASS_NAMES[name], superlabels=superlabels,
        superclass_names=superclass_names)


def _has_tensorflow() -> bool:
    return importlib.util.find_spec("tensorflow") is not None


class DatasetUnavailable(RuntimeError):
    """A dataset that is not on this machine and cannot be prepared here; the message says what to run."""


def _cifar_help(name: str, data_dir: str | None, cause: BaseException | None = None) -> str:
    where = data_dir or "tfds's default data_dir ($TFDS_DATA_DIR or ~/tensorflow_datasets)"
    return (
        f"{name} is not prepared as ArrayRecord files in {where}, and it could not be prepared "
        f"here. Preparing it once needs TensorFlow and internet: run\n"
        f"    pip install -e '.[cifar]'\n"
        f"    python -c \"from experiments.data import load_cifar; "
        f"load_cifar({name!r}, data_dir={data_dir!r})\"\n"
        f"after which reading it needs neither."
        + (f" (tfds: {type(cause).__name__}: {(str(cause).strip().splitlines() or [''])[0][:200]})" if cause else ""))
