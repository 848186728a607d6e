"""Train a classifier with optax, reproducibly from a seed, resumable from orbax checkpoints.

Two presets (`TrainConfig`):

- ``TrainConfig.authors()``, the paper authors' recipe (docs/method.md): SGD, learning
  rate 0.1, momentum 0.9, weight decay 5e-4, learning rate x0.2 after epochs 30, 60 and 90,
  100 epochs, batch 64, random crop with padding 4, horizontal flip, rotation up to 15 degrees.
- ``TrainConfig()``, a faster default: SGD with Nesterov momentum 0.9, weight decay 5e-4, batch
  128, a linear warm-up to 0.1 over 2 epochs then a cosine decay to 0, 30 epochs, random crop
  with padding 4 and horizontal flip; meant for a GPU.
- ``TrainConfig.until_plateau(max_epochs)``, the same optimiser (at rate 0.02) trained until a held-out
  loss stops improving (``schedule="plateau"``): a share of the train images
  (``validation_fraction``) is set aside; after each epoch, when their loss has not fallen by
  more than ``min_delta`` of its best for ``patience`` epochs (or their accuracy is already 1),
  the learning rate is multiplied by ``lr_decay_factor``; the plateau after the ``max_decays``-th decay ends
  the run, and ``epochs`` caps it. The number of epochs then adapts to the data: a hard data set
  trains longer, an easy one stops early, both end at a low learning rate. The test images
  never take part in a decision.

Weight decay is PyTorch's: ``weight_decay * param`` added to every gradient (batch-norm scales and
biases included) before the momentum. Images are never normalised. Each epoch visits
``N // batch_size`` batches of a fresh permutation (the remainder is left out of that epoch).

Everything random derives from ``seed``: the initial variables, the permutations and the
augmentations of each epoch (``fold_in(key, epoch)``), so a run stopped after any epoch and
resumed from its checkpoint ends with the same variables as one that ran through.
"""
import dataclasses
import functools
import json
import math
import os
import warnings
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
from jax import lax
from jax.scipy import ndimage
from tqdm.auto import tqdm

from models.capture import init_variables, rebuild_model

_SCHEDULES = ("cosine", "step", "plateau")


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """Optimiser, schedule and augmentation of a training run (the default is the fast recipe).

    Attributes:
        epochs: length of the run; the learning-rate schedule spans all of it (``"plateau"``:
            the most epochs the run may take).
        batch_size: training batch size.
        learning_rate: peak (``"cosine"``) or initial (``"step"``) learning rate.
        momentum: SGD momentum.
        nesterov: Nesterov momentum.
        weight_decay: L2 coefficient added to the gradient (PyTorch's SGD ``weight_decay``).
        schedule: ``"cosine"``: linear warm-up from 0 over ``warmup_epochs``, then cosine decay
            to 0 at the end; ``"step"``: multiply by ``lr_decay_factor`` after each epoch of
            ``lr_decay_epochs``; ``"plateau"``: linear warm-up, then constant, multiplied by
            ``lr_decay_factor`` at each plateau of the validation accuracy (module docstring).
        warmup_epochs: warm-up length of the ``"cosine"`` and ``"plateau"`` schedules.
        lr_decay_epochs: epochs after which the ``"step"`` schedule decays.
        lr_decay_factor: the ``"step"`` and ``"plateau"`` schedules' factor.
        patience: ``"plateau"``: epochs without improvement that make a plateau.
        min_delta: ``"plateau"``: the fall of the validation loss below its best, relative to
            it, that counts as an improvement (e.g. 0.001).
        max_decays: ``"plateau"``: learning-rate decays before the next plateau ends the run.
        validation_fraction: ``"plateau"``: the share of the train images held out to measure
            the plateau on (drawn from ``seed``; they are not trained on).
        crop_padding: zero padding of the random crop (0: no crop).
        flip: random horizontal flips.
        max_rotation: rotations uniform in +-``max_rotation`` degrees, nearest neighbour, zero
            fill, as torchvision's ``RandomRotation`` (0: none).
        eval_batch_size: batch size of the evaluation.
    """

    epochs: int = 30
    batch_size: int = 128
    learning_rate: float = 0.1
    momentum: float = 0.9
    nesterov: bool = True
    weight_decay: float = 5e-4
    schedule: str = "cosine"
    warmup_epochs: int = 2
    lr_decay_epochs: tuple[int, ...] = ()
    lr_decay_factor: float = 0.2
    crop_padding: int = 4
    flip: bool = True
    max_rotation: float = 0.0
    eval_batch_size: int = 500
    patience: int = 3
    min_delta: float = 1e-3
    max_decays: int = 2
    validation_fraction: float = 0.1

    def __post_init__(self):
        for name in ("epochs", "batch_size", "eval_batch_size", "warmup_epochs", "crop_padding", "patience",
                     "max_decays"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
                raise TypeError(f"{name} must be an int, got {value!r}")
        for name in ("epochs", "batch_size", "eval_batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        for name in ("learning_rate", "momentum", "weight_decay", "lr_decay_factor", "max_rotation", "min_delta",
                     "validation_fraction"):
            value = getattr(self, name)
            if isinstance(value, (bool, str)) or not isinstance(value, (int, float, np.number)):
                raise TypeError(f"{name} must be a number, got {value!r}")
            if not math.isfinite(value):
                raise ValueError(f"{name} must be finite, got {value}")
        if not self.learning_rate > 0:
            raise ValueError(f"learning_rate must be > 0, got {self.learning_rate}")
        if not 0 <= self.momentum < 1:
            raise ValueError(f"momentum must lie in [0, 1), got {self.momentum}")
        if self.weight_decay < 0:
            raise ValueError(f"weight_decay must be >= 0, got {self.weight_decay}")
        if not self.lr_decay_factor > 0:
            raise ValueError(f"lr_decay_factor must be > 0, got {self.lr_decay_factor}")
        for name in ("nesterov", "flip"):
            if not isinstance(getattr(self, name), (bool, np.bool_)):
                raise TypeError(f"{name} must be True or False, got {getattr(self, name)!r}")
        if self.schedule not in _SCHEDULES:
            raise ValueError(f"schedule must be one of {_SCHEDULES}, got {self.schedule!r}")
        if self.schedule == "plateau":
            if self.patience < 1:
                raise ValueError(f"patience must be at least 1, got {self.patience}")
            if self.max_decays < 0 or self.min_delta < 0:
                raise ValueError("max_decays and min_delta must be non-negative")
            if not 0 < self.validation_fraction < 1:
                raise ValueError(f"validation_fraction must lie in (0, 1), got {self.validation_fraction}")
            if not 0 < self.lr_decay_factor < 1:
                raise ValueError(f"lr_decay_factor must lie in (0, 1) for schedule 'plateau', got "
                                 f"{self.lr_decay_factor}")
        if self.schedule in ("cosine", "plateau") and not 0 <= self.warmup_epochs < self.epochs:
            raise ValueError(
                f"warmup_epochs must lie in [0, epochs={self.epochs}), got {self.warmup_epochs}"
            )
        if self.crop_padding < 0 or self.max_rotation < 0:
            raise ValueError("crop_padding and max_rotation must be non-negative")
        object.__setattr__(self, "lr_decay_epochs", tuple(self.lr_decay_epochs))

    @classmethod
    def authors(cls) -> "TrainConfig":
        """The recipe of the paper's authors (docs/method.md)."""
        return cls(
            epochs=100,
            batch_size=64,
            learning_rate=0.1,
            momentum=0.9,
            nesterov=False,
            weight_decay=5e-4,
            schedule="step",
            lr_decay_epochs=(30, 60, 90),
            lr_decay_factor=0.2,
            crop_padding=4,
            flip=True,
            max_rotation=15.0,
        )

    @classmethod
    def until_plateau(cls, max_epochs: int = 60, **changes) -> "TrainConfig":
        """The fast recipe's optimiser at learning rate 0.02, trained until the validation loss
        stops improving (``schedule="plateau"``, module docstring), for at most ``max_epochs``
        epochs, after a one-epoch warm-up; ``changes`` replace any other field.

        The rate: held constant at the cosine schedule's peak of 0.1, a width-8 ResNet-18 did not
        learn ``shapes`` (test accuracy 0.44 after 17 epochs at batch 64); at 0.02 it did (README,
        "Training until the held-out loss stops improving")."""
        return cls(**{"epochs": max_epochs, "schedule": "plateau", "warmup_epochs": 1, "learning_rate": 0.02,
                      **changes})


class TrainResult(NamedTuple):
    """What `train` returns.

    Attributes:
        variables: the final ``{"params", "batch_stats"}``.
        test_accuracy: accuracy of ``variables`` on the test images, measured by this call (not
            read from a checkpoint).
        history: one dict per epoch: ``epoch`` (1-based), ``learning_rate`` (of its last step),
            ``train_loss`` (mean cross-entropy of its batches), ``test_accuracy`` and, with the
            ``"plateau"`` schedule, ``validation_accuracy`` and ``validation_loss`` (mean
            cross-entropy of the held-out images).
        stopped: why the run ended: ``"plateau"`` (the validation loss stopped improving after
            the last decay), ``"max_epochs"`` (``config.epochs`` ran) or ``"epochs"`` (the
            ``epochs`` argument of `train` stopped it first).
    """

    variables: dict
    test_accuracy: float
    history: tuple[dict, ...]
    stopped: str = "max_epochs"


class PlateauState(NamedTuple):
    """Where a ``"plateau"`` run stands after the epochs of a history (`plateau_state`).

    decays: learning-rate decays so far; the next epoch trains at ``lr_decay_factor ** decays``
    times the rate. done: the run has ended (a plateau after ``max_decays`` decays).
    """

    decays: int
    done: bool


def plateau_state(history, config: TrainConfig) -> PlateauState:
    """Replay the plateau rule over the epochs of a history (dicts with ``validation_loss`` and
    ``validation_accuracy``, as `train` records them).

    After each epoch past the warm-up: a validation loss (mean cross-entropy) below the best so
    far by more than ``min_delta`` of it resets the wait (and becomes the best); otherwise the wait
    grows by one, and a validation accuracy of 1 fills it at once (the held-out images can tell
    nothing more). A full wait (``patience``) is a plateau: the rate decays and the wait restarts,
    or, after ``max_decays`` decays, the run ends. The loss, not the accuracy, is watched: on a
    slow stretch (a saddle) the loss still falls while the accuracy stalls, and the accuracy of a
    few hundred images moves in coarse steps. A pure function of the history, so a resumed run
    takes the decisions of one that never stopped.
    """
    best, wait, decays = np.inf, 0, 0
    for epoch, record in enumerate(history, start=1):
        loss = record["validation_loss"]
        if epoch <= config.warmup_epochs:
            best = min(best, loss)
            continue
        if loss < best * (1 - config.min_delta):
            wait = 0
        else:
            wait += 1
        best = min(best, loss)
        if record["validation_accuracy"] >= 1.0:
            wait = config.patience
        if wait >= config.patience:
            if decays == config.max_decays:
                return PlateauState(decays, True)
            decays, wait = decays + 1, 0
    return PlateauState(decays, False)


class _TrainState(NamedTuple):
    params: Any
    batch_stats: Any
    opt_state: Any


def _learning_rate(config: TrainConfig, steps_per_epoch: int) -> optax.Schedule:
    if config.schedule == "step":
        # Step count e * steps_per_epoch, the first of epoch e + 1, is the first to use the
        # decayed rate, as with PyTorch's MultiStepLR stepped once per epoch.
        return optax.piecewise_constant_schedule(
            config.learning_rate,
            {e * steps_per_epoch: config.lr_decay_factor for e in config.lr_decay_epochs},
        )
    if config.schedule == "plateau":  # the decays are applied per epoch, by `train` (``lr_scale``)
        return optax.linear_schedule(0.0, config.learning_rate, config.warmup_epochs * steps_per_epoch)
    return optax.warmup_cosine_decay_schedule(
        0.0,
        config.learning_rate,
        config.warmup_epochs * steps_per_epoch,
        config.epochs * steps_per_epoch,
    )


def _optimizer(config: TrainConfig, steps_per_epoch: int) -> optax.GradientTransformation:
    return optax.chain(
        optax.add_decayed_weights(config.weight_decay),
        optax.sgd(_learning_rate(config, steps_per_epoch), config.momentum, config.nesterov),
    )


def _rotate(image: jax.Array, angle: jax.Array) -> jax.Array:
    """(H, W, C) image rotated by ``angle`` radians about its centre; nearest pixel, zero fill."""
    h, w, _ = image.shape
    y, x = jnp.meshgrid(
        jnp.arange(h, dtype=jnp.float32) - (h - 1) / 2,
        jnp.arange(w, dtype=jnp.float32) - (w - 1) / 2,
        indexing="ij",
    )
    cos, sin = jnp.cos(angle), jnp.sin(angle)
    source = [cos * y - sin * x + (h - 1) / 2, sin * y + cos * x + (w - 1) / 2]
    rotate = functools.partial(ndimage.map_coordinates, order=0, mode="constant", cval=0.0)
    return jax.vmap(lambda channel: rotate(channel, source), in_axes=-1, out_axes=-1)(image)


def augment(images: jax.Array, key: jax.Array, config: TrainConfig) -> jax.Array:
    """Per image random crop with zero padding, horizontal flip and rotation: (B, H, W, C)."""
    b, h, w, c = images.shape
    crop_key, flip_key, rotation_key = jax.random.split(key, 3)
    p = config.crop_padding
    if p:
        padded = jnp.pad(images, ((0, 0), (p, p), (p, p), (0, 0)))
        corners = jax.random.randint(crop_key, (b, 3), 0, 2 * p + 1, dtype=jnp.int32)
        corners = corners.at[:, 2].set(0)  # (top, left, channel 0)
        images = jax.vmap(lambda image, start: lax.dynamic_slice(image, start, (h, w, c)))(
            padded, corners
        )
    if config.flip:
        flip = jax.random.bernoulli(flip_key, 0.5, (b, 1, 1, 1))
        images = jnp.where(flip, images[:, :, ::-1, :], images)
    if config.max_rotation:
        limit = math.radians(config.max_rotation)
        angles = jax.random.uniform(rotation_key, (b,), jnp.float32, -limit, limit)
        images = jax.vmap(_rotate)(images, angles)
    return images


@functools.partial(jax.jit, static_argnames=("model", "config", "steps_per_epoch"))
def _train_step(state, images, labels, batch, key, lr_scale, *, model, config, steps_per_epoch):
    """One SGD step on ``images[batch]``; the update is scaled by ``lr_scale`` (the plateau
    decays: SGD's last operation multiplies by the learning rate, so this scales the rate)."""
    x = augment(images[batch], key, config)

    def loss_fn(params):
        logits, updates = model.apply(
            {"params": params, "batch_stats": state.batch_stats},
            x,
            train=True,
            mutable=["batch_stats"],
        )
        loss = optax.softmax_cross_entropy_with_integer_labels(logits, labels[batch]).mean()
        return loss, updates["batch_stats"]

    (loss, batch_stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    tx = _optimizer(config, steps_per_epoch)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    updates = jax.tree.map(lambda u: u * lr_scale.astype(u.dtype), updates)
    return _TrainState(optax.apply_updates(state.params, updates), batch_stats, opt_state), loss


@functools.partial(jax.jit, static_argnames=("model",))
def _correct_and_loss(variables, images, labels, mask, *, model):
    """(correct predictions, summed cross-entropy) over the unmasked images of a batch."""
    logits = model.apply(variables, images, train=False)
    correct = jnp.sum((jnp.argmax(logits, axis=-1) == labels) & mask)
    loss = optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), labels)
    return correct, jnp.sum(jnp.where(mask, loss, 0.0))


def _evaluate(model, variables, images: np.ndarray, labels: np.ndarray, batch_size: int) -> tuple[float, float]:
    """(accuracy, mean cross-entropy) of ``variables`` on the images, in inference mode."""
    n = len(images)
    batch_size = min(batch_size, n)
    pad = -n % batch_size  # the last batch is padded, so that one compilation serves all
    images = np.concatenate([images, np.zeros((pad, *images.shape[1:]), images.dtype)])
    labels = np.concatenate([labels, np.zeros(pad, labels.dtype)])
    mask = np.arange(n + pad) < n
    correct, loss = 0, 0.0
    for i in range(0, n + pad, batch_size):
        c, l = _correct_and_loss(variables, images[i : i + batch_size], labels[i : i + batch_size],
                                 mask[i : i + batch_size], model=model)
        correct, loss = correct + int(c), loss + float(l)
    return correct / n, loss / n


def _accuracy(model, variables, images: np.ndarray, labels: np.ndarray, batch_size: int) -> float:
    """The accuracy of ``variables`` on the images, in inference mode."""
    return _evaluate(model, variables, images, labels, batch_size)[0]


def _check_images(name: str, images) -> np.ndarray:
    images = np.asarray(images)
    if images.ndim != 4:
        raise ValueError(f"{name} must be (N, H, W, C) images, got shape {images.shape}")
    if images.dtype == np.uint8:
        return images.astype(np.float32) / 255
    if not np.issubdtype(images.dtype, np.floating):
        raise ValueError(f"{name} must be floats in [0, 1] or uint8, got dtype {images.dtype}")
    if images.size and not (images.min() >= 0 and images.max() <= 1):
        raise ValueError(
            f"{name} must lie in [0, 1], got values in [{images.min()}, {images.max()}]"
        )
    return images.astype(np.float32)


def _check_labels(name: str, labels, n_images: int, images_name: str, num_classes: int):
    labels = np.asarray(labels)
    if labels.ndim != 1 or not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(
            f"{name} must be a 1-d integer array, got shape {labels.shape}, dtype {labels.dtype}"
        )
    if len(labels) != n_images:
        raise ValueError(f"{images_name} has {n_images} images but {name} has {len(labels)} labels")
    if len(labels) and (labels.min() < 0 or labels.max() >= num_classes):
        raise ValueError(
            f"{name} must lie in [0, {num_classes}) (the model's num_classes), "
            f"got values in [{labels.min()}, {labels.max()}]"
        )
    return labels.astype(np.int32)


def _check_data(model, train_images, train_labels, test_images, test_labels):
    train_images = _check_images("train_images", train_images)
    test_images = _check_images("test_images", test_images)
    if len(test_images) == 0:
        raise ValueError("test_images must hold at least one image")
    if test_images.shape[1:] != train_images.shape[1:]:
        raise ValueError(
            f"test_images must have the train images' (H, W, C) = {train_images.shape[1:]}, "
            f"got {test_images.shape[1:]}"
        )
    k = model.num_classes
    train_labels = _check_labels("train_labels", train_labels, len(train_images), "train_images", k)
    test_labels = _check_labels("test_labels", test_labels, len(test_images), "test_images", k)
    return train_images, train_labels, test_images, test_labels


class _Unusable(Exception):
    """A checkpoint that cannot be read or holds no usable state; the message says why."""


def _summary(error: BaseException) -> str:
    """An error in one short line (orbax's messages can run to pages)."""
    lines = str(error).strip().splitlines() or [""]
    return f"{type(error).__name__}: {lines[0][:200]}"


def _non_finite(tree) -> str | None:
    """The path of the first leaf of ``tree`` with a NaN or an infinity, or None."""
    for path, leaf in jax.tree_util.tree_leaves_with_path(tree):
        if not np.all(np.isfinite(np.asarray(leaf))):
            return jax.tree_util.keystr(path)
    return None


def _mismatch(restored, fresh) -> str | None:
    """Why ``restored`` cannot stand for the ``fresh`` state, or None: another tree, other
    shapes or dtypes, or a non-finite value."""
    if jax.tree.structure(restored) != jax.tree.structure(fresh):
        return "its state is not the model's: another tree of arrays"
    for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(restored), jax.tree.leaves(fresh)):
        if a.shape != b.shape or a.dtype != b.dtype:
            return (f"{jax.tree_util.keystr(path)} is {a.dtype}{list(a.shape)}, the model's "
                    f"{b.dtype}{list(b.shape)}")
    bad = _non_finite(restored)
    return f"{bad} holds NaN or infinite values" if bad else None


def _read_checkpoint(manager: ocp.CheckpointManager, step: int, state: _TrainState, run: dict):
    """The verified state and history of checkpoint ``step``; `_Unusable` if it has none, a
    ValueError if it belongs to another run."""
    try:
        meta = manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore())).meta
        recorded_run, history = meta["run"], list(meta["history"])
    except Exception as error:  # orbax raises JSON, Unicode, key, TensorStore... errors
        raise _Unusable(f"unreadable metadata, {_summary(error)}") from None
    if recorded_run != run:  # checked before the arrays, whose shapes may not even match
        raise ValueError(
            f"checkpoint_dir {manager.directory} holds a different run (use another folder or "
            f"delete it): {recorded_run}; this one is {run}"
        )
    if len(history) != step:
        raise _Unusable(f"its history has {len(history)} epochs")
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, state)
    try:
        restored = manager.restore(
            step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract))
        ).state
    except Exception as error:
        raise _Unusable(f"unreadable arrays, {_summary(error)}") from None
    problem = _mismatch(restored, state)
    if problem:
        raise _Unusable(problem)
    return restored, history


def _restore(manager: ocp.CheckpointManager, state: _TrainState, run: dict, epochs: int):
    """The state and history of the newest usable checkpoint, or ``state`` and no history if
    there is no checkpoint.

    A checkpoint that cannot be read, or whose state is not the model's (tree, shapes, dtypes)
    or not finite, is passed over for the one before it (orbax keeps two) with a RuntimeWarning,
    and deleted, so that training saves its epoch again. A ValueError, naming the folder, refuses
    a checkpoint of another run or past ``epochs``, and a folder with no usable checkpoint.
    """
    folder = manager.directory
    problems = []
    for step in sorted(manager.all_steps(), reverse=True):
        try:
            restored, history = _read_checkpoint(manager, step, state, run)
        except _Unusable as problem:
            problems.append((step, str(problem)))
            continue
        if step > epochs:
            raise ValueError(f"checkpoint_dir {folder} holds epoch {step}, past epochs={epochs}")
        if problems:
            warnings.warn(
                f"checkpoint_dir {folder}: "
                + "; ".join(f"the checkpoint of epoch {bad} is unusable ({why})"
                            for bad, why in problems)
                + f"; resuming from epoch {step} and deleting the unusable ones",
                RuntimeWarning,
                stacklevel=3,
            )
            for bad, _ in problems:
                manager.delete(bad)
        return restored, history
    if problems:
        raise ValueError(
            f"checkpoint_dir {folder} holds no usable checkpoint ("
            + "; ".join(f"epoch {bad}: {why}" for bad, why in problems)
            + "); delete the folder to train from scratch"
        )
    return state, []


def _check_checkpoint_dir(checkpoint_dir) -> None:
    """Refuse, before any epoch, a ``checkpoint_dir`` that is, or lies under, a file, or that cannot
    be written (orbax would only fail in its background thread after the first epoch)."""
    path = os.path.abspath(checkpoint_dir)
    existing = path
    while not os.path.exists(existing):
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing):
        where = "is a file" if existing == path else f"lies under the file {existing}"
        raise ValueError(f"checkpoint_dir {path} {where}: give a folder")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ValueError(f"checkpoint_dir {path}: {existing} is not writable")


def train(
    model: nn.Module,
    train_images,
    train_labels,
    test_images,
    test_labels,
    config: TrainConfig,
    *,
    seed: int,
    checkpoint_dir: str | os.PathLike | None = None,
    epochs: int | None = None,
    progress: bool = True,
) -> TrainResult:
    """Train ``model`` from scratch (or from the last checkpoint in ``checkpoint_dir``).

    Args:
        model: a network from `models.build_model` (any Linen module with ``num_classes`` whose
            ``__call__(x, train)`` returns logits and keeps BatchNorm statistics).
        train_images, test_images: (N, H, W, C) floats in [0, 1] or uint8 (divided by 255).
        train_labels, test_labels: (N,) integers in [0, model.num_classes).
        config: optimiser, schedule and augmentation.
        seed: the seed everything random derives from.
        checkpoint_dir: if given, the state is saved there with orbax after every epoch (the
            last two are kept), and a run that finds a checkpoint there resumes after its epoch;
            the checkpoint must come from a run with the same model, config, seed and data sizes.
            A checkpoint that cannot be read or holds another tree, other shapes or non-finite
            values is passed over for the previous one, with a RuntimeWarning; a ValueError
            names the folder when none is usable.
        epochs: stop after this epoch (default ``config.epochs``). The schedule still spans
            ``config.epochs``, so a later call resumes and finishes the same run.
        progress: show a tqdm progress bar.

    With ``config.schedule == "plateau"`` a share ``config.validation_fraction`` of the train
    images (at least one image, drawn from ``seed``) is held out and never trained on; the run
    decays its learning rate and stops by their accuracy (`plateau_state`).

    Returns:
        `TrainResult` with the variables, the last test accuracy, the per-epoch history and why
        the run stopped.
    """
    if not isinstance(config, TrainConfig):
        raise TypeError(f"config must be a models.TrainConfig, got {type(config).__name__}")
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)):
        raise TypeError(f"seed must be an int, got {seed!r}")
    if epochs is not None and (isinstance(epochs, bool) or not isinstance(epochs, (int, np.integer))):
        raise TypeError(f"epochs must be an int or None, got {epochs!r}")
    train_images, train_labels, test_images, test_labels = _check_data(
        model, train_images, train_labels, test_images, test_labels
    )
    init_key, data_key = jax.random.split(jax.random.key(seed))
    validation = None
    if config.schedule == "plateau":
        n_held = max(1, round(config.validation_fraction * len(train_images)))
        order = np.asarray(jax.random.permutation(jax.random.fold_in(data_key, 0), len(train_images)))
        held, kept = np.sort(order[:n_held]), np.sort(order[n_held:])
        validation = (train_images[held], train_labels[held])
        train_images, train_labels = train_images[kept], train_labels[kept]
    n_train = len(train_images)
    if config.batch_size > n_train:
        raise ValueError(
            f"config.batch_size={config.batch_size} exceeds the {n_train} train images"
            + (" left after the validation split" if validation is not None else "")
        )
    epochs = config.epochs if epochs is None else epochs
    if not 1 <= epochs <= config.epochs:
        raise ValueError(f"epochs must lie in [1, config.epochs={config.epochs}], got {epochs}")

    steps_per_epoch = n_train // config.batch_size
    variables = init_variables(model, init_key, (1, *train_images.shape[1:]))
    tx = _optimizer(config, steps_per_epoch)
    state = _TrainState(variables["params"], variables["batch_stats"], tx.init(variables["params"]))
    run = {
        "model": repr(model),
        "config": dataclasses.asdict(config),
        "seed": seed,
        "n_train": n_train,
        "n_test": len(test_images),
    }
    run = json.loads(json.dumps(run))  # as it reads back from JSON (tuples become lists)
    history: list[dict] = []
    manager = None
    if checkpoint_dir is not None:
        _check_checkpoint_dir(checkpoint_dir)
        manager = ocp.CheckpointManager(
            os.path.abspath(checkpoint_dir),
            options=ocp.CheckpointManagerOptions(max_to_keep=2, create=True),
        )
        state, history = _restore(manager, state, run, epochs)

    learning_rate = _learning_rate(config, steps_per_epoch)
    train_x, train_y = jnp.asarray(train_images), jnp.asarray(train_labels)
    step = functools.partial(
        _train_step, model=model, config=config, steps_per_epoch=steps_per_epoch
    )
    bar = tqdm(
        total=epochs * steps_per_epoch,
        initial=len(history) * steps_per_epoch,
        desc="train",
        disable=not progress,
    )
    trained_here, stopped = False, "max_epochs" if epochs == config.epochs else "epochs"
    for epoch in range(len(history) + 1, epochs + 1):
        lr_scale = 1.0
        if validation is not None:
            plateau = plateau_state(history, config)
            if plateau.done:
                break
            lr_scale = config.lr_decay_factor ** plateau.decays
        trained_here = True
        epoch_key = jax.random.fold_in(data_key, epoch)
        order_key, augment_key = jax.random.split(epoch_key)
        order = jax.random.permutation(order_key, n_train).astype(jnp.int32)
        losses = []
        for i in range(steps_per_epoch):
            batch = order[i * config.batch_size : (i + 1) * config.batch_size]
            state, loss = step(state, train_x, train_y, batch, jax.random.fold_in(augment_key, i),
                               jnp.float32(lr_scale))
            losses.append(loss)
            bar.update()
        variables = {"params": state.params, "batch_stats": state.batch_stats}
        history.append(
            {
                "epoch": epoch,
                "learning_rate": float(learning_rate(epoch * steps_per_epoch - 1)) * lr_scale,
                "train_loss": float(jnp.mean(jnp.stack(losses))),
                "test_accuracy": _accuracy(
                    model, variables, test_images, test_labels, config.eval_batch_size
                ),
            }
        )
        if validation is not None:
            held_accuracy, held_loss = _evaluate(model, variables, *validation, config.eval_batch_size)
            history[-1].update(validation_accuracy=held_accuracy, validation_loss=held_loss)
        record = history[-1]
        bar.set_postfix(
            epoch=epoch, loss=f"{record['train_loss']:.3f}", test_acc=record["test_accuracy"],
            **({"val_acc": record["validation_accuracy"]} if validation is not None else {}),
        )
        if manager is not None:
            manager.save(
                epoch,
                args=ocp.args.Composite(
                    state=ocp.args.StandardSave(state),
                    meta=ocp.args.JsonSave({"run": run, "history": list(history)}),
                ),
            )
    bar.close()
    if validation is not None and plateau_state(history, config).done:
        stopped = "plateau"
    if manager is not None:
        manager.wait_until_finished()
        manager.close()
    variables = {"params": state.params, "batch_stats": state.batch_stats}
    # the accuracy of the variables returned: the last epoch's if it ran here, else measured now
    # (a checkpoint's history is not trusted for it)
    if trained_here:
        test_accuracy = history[-1]["test_accuracy"]
    else:
        test_accuracy = _accuracy(
            model, variables, test_images, test_labels, config.eval_batch_size
        )
    return TrainResult(variables, test_accuracy, tuple(history), stopped)


_REQUIRED_METADATA = ("dataset", "test_accuracy")


def save_model(
    path: str | os.PathLike,
    model_name: str,
    model_kwargs: dict,
    variables: dict,
    metadata: dict,
) -> None:
    """Save a trained network to the directory ``path`` (overwritten if it exists).

    Args:
        path: a directory; it receives ``variables/`` (orbax) and ``model.json``.
        model_name, model_kwargs: rebuild the network as
            ``build_model(model_name, **model_kwargs)``, e.g. ``"resnet18"``,
            ``{"num_classes": 10, "width": 64}``; any other Flax Linen module as
            ``"package.module:Class"`` and its fields, which ``models.capture.model_spec(module)``
            gives (the class must be importable there when the model is loaded).
        variables: its ``{"params", "batch_stats"}``.
        metadata: JSON-serialisable; must hold ``"dataset"`` (what it was trained on) and
            ``"test_accuracy"``; the seed, the config (``dataclasses.asdict``) and the input
            shape are worth adding.
    """
    rebuild_model(model_name, model_kwargs)  # fails early on a bad name or kwargs
    missing = [key for key in _REQUIRED_METADATA if key not in metadata]
    if missing:
        raise ValueError(f"metadata must hold {list(_REQUIRED_METADATA)}; missing {missing}")
    description = json.dumps(
        {"model_name": model_name, "model_kwargs": model_kwargs, "metadata": metadata}, indent=2
    )  # fails early on anything that is not JSON
    path = os.path.abspath(path)
    os.makedirs(path, exist_ok=True)
    checkpointer = ocp.StandardCheckpointer()
    checkpointer.save(os.path.join(path, "variables"), variables, force=True)
    checkpointer.wait_until_finished()
    temporary = os.path.join(path, f".model.json.{os.getpid()}.tmp")
    with open(temporary, "w") as f:  # then renamed: model.json is never seen half written
        f.write(description)
    os.replace(temporary, os.path.join(path, "model.json"))


def load_model(path: str | os.PathLike) -> tuple[nn.Module, dict, dict]:
    """The ``(model, variables, metadata)`` that `save_model` wrote to ``path``.

    A network of another class than the project's is rebuilt by importing the module that
    ``model.json`` names (``models.rebuild_model``): load only folders you trust.

    Raises:
        ValueError: naming ``path``, when it holds no readable model or non-finite variables.
    """
    path = os.path.abspath(path)
    try:
        with open(os.path.join(path, "model.json")) as f:
            description = json.load(f)
        model = rebuild_model(description["model_name"], description["model_kwargs"])
        metadata = description["metadata"]
        variables = ocp.StandardCheckpointer().restore(os.path.join(path, "variables"))
    except Exception as error:  # a missing or damaged file, of any of orbax's many kinds
        raise ValueError(f"{path} holds no readable saved model ({_summary(error)})") from None
    bad = _non_finite(variables)
    if bad:
        raise ValueError(f"{path}: the saved model's {bad} holds NaN or infinite values")
    return model, variables, metadata
