"""Training, checkpoints and saved models of `models.train`."""
import dataclasses
import functools
import importlib
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import models
from tiny_data import colour_data

# The module, which the function `models.train` shadows as an attribute of the package.
train_module = importlib.import_module("models.train")

# A ResNet of two one-block stages, width 4, on 8x8 images: tiny, so that it compiles fast.
MODEL_KWARGS = {"num_classes": 3, "width": 4, "stage_sizes": (1, 1)}
CONFIG = models.TrainConfig(
    epochs=3, batch_size=16, learning_rate=0.05, warmup_epochs=0, crop_padding=1, max_rotation=10.0
)


@pytest.fixture(scope="module")
def data():
    return (*colour_data(96, seed=0), *colour_data(40, seed=1))


@pytest.fixture(scope="module")
def model():
    return models.build_model("resnet18", **MODEL_KWARGS)


@pytest.fixture(scope="module")
def result(model, data):
    return models.train(model, *data, CONFIG, seed=0, progress=False)


@functools.partial(jax.jit, static_argnums=0)
def logits(model, variables, images):
    return model.apply(variables, images, train=False)


def assert_trees_equal(a, b):
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        assert x.dtype == y.dtype
        np.testing.assert_array_equal(x, y)


def test_training_lowers_the_loss(model, data, result):
    losses = [h["train_loss"] for h in result.history]
    assert [h["epoch"] for h in result.history] == [1, 2, 3]
    assert losses[0] > losses[1] > losses[2] and losses[2] < 0.6 * losses[0]
    assert result.test_accuracy == result.history[-1]["test_accuracy"] > 0.9
    # The reported accuracy is the model's, in inference mode.
    test_images, test_labels = data[2], data[3]
    predicted = jnp.argmax(logits(model, result.variables, test_images), axis=-1)
    assert np.mean(np.asarray(predicted) == test_labels) == result.test_accuracy


def test_same_seed_same_run_other_seed_other_run(model, data, result):
    again = models.train(model, *data, CONFIG, seed=0, progress=False)
    assert_trees_equal(again.variables, result.variables)
    other = models.train(model, *data, CONFIG, seed=1, progress=False)
    head = lambda r: r.variables["params"]["head"]["kernel"]
    assert not np.array_equal(head(other), head(result))


def test_resumed_run_equals_uninterrupted_run(model, data, result, tmp_path, monkeypatch):
    run = functools.partial(
        models.train, model, *data, CONFIG, checkpoint_dir=tmp_path, progress=False
    )
    first = run(seed=0, epochs=2)  # as if killed after epoch 2 of 3
    assert [h["epoch"] for h in first.history] == [1, 2]

    steps, step = [], train_module._train_step
    counting_step = lambda *args, **kwargs: steps.append(1) or step(*args, **kwargs)
    monkeypatch.setattr(train_module, "_train_step", counting_step)
    resumed = run(seed=0)
    assert len(steps) == len(data[0]) // CONFIG.batch_size  # one epoch: the third
    assert resumed.history == result.history
    assert_trees_equal(resumed.variables, result.variables)

    # A finished run is read back without training; a different run is refused.
    done = run(seed=0)
    assert len(steps) == len(data[0]) // CONFIG.batch_size and done.history == result.history
    with pytest.raises(ValueError, match="different run"):
        run(seed=1)


PLATEAU = models.TrainConfig.until_plateau(
    12, batch_size=16, learning_rate=0.05, crop_padding=1, patience=2, max_decays=1, validation_fraction=0.25
)


def epochs(losses, accuracies=None):
    """A history with these validation losses (and accuracies, 0.5 by default)."""
    accuracies = accuracies or [0.5] * len(losses)
    return [{"validation_loss": l, "validation_accuracy": a} for l, a in zip(losses, accuracies)]


@pytest.mark.parametrize(
    "history, expected",
    [
        # warm-up epoch 1 is not judged; 0.6 twice without a fall below the best is a plateau
        (epochs([2.0, 1.0, 0.6, 0.6, 0.6]), (1, False)),
        (epochs([2.0, 1.0, 0.6, 0.6, 0.6, 0.5, 0.5, 0.5]), (1, True)),
        # a fall of min_delta (0.1%) of the best or less is no improvement
        (epochs([2.0, 1.0, 0.9995, 0.9991, 0.5]), (1, False)),
        # a held-out accuracy of 1 cannot improve: each such epoch is a plateau of its own
        (epochs([2.0, 1.0], [0.3, 1.0]), (1, False)),
        (epochs([2.0, 1.0, 0.9], [0.3, 1.0, 1.0]), (1, True)),
        (epochs([2.0, 1.0, 0.9, 0.8, 0.7, 0.6]), (0, False)),
    ],
)
def test_plateau_rule(history, expected):
    assert tuple(train_module.plateau_state(history, PLATEAU)) == expected


def test_plateau_rule_against_a_direct_simulation():
    """Random loss and accuracy sequences: the rule equals a plain re-statement of it (patience 3,
    two decays, min_delta 0.1%)."""
    config = models.TrainConfig.until_plateau(40, warmup_epochs=2)
    rng = np.random.default_rng(0)
    for _ in range(300):
        n = rng.integers(1, 40)
        losses = list(np.exp(np.cumsum(rng.uniform(-0.05, 0.03, n))))
        accuracies = list(np.where(rng.random(n) < 0.05, 1.0, 0.9))
        decays, best, since, expected = 0, min(losses[:2]), 0, None
        for loss, accuracy in zip(losses[2:], accuracies[2:]):
            since = 0 if loss < best * 0.999 else since + 1
            best = min(best, loss)
            since = 3 if accuracy == 1 else since
            if since == 3:
                if decays == 2:
                    expected = (2, True)
                    break
                decays, since = decays + 1, 0
        history = epochs(losses, accuracies)
        assert tuple(train_module.plateau_state(history, config)) == (expected or (decays, False))


@pytest.fixture(scope="module")
def plateau_result(model, data):
    return models.train(model, *data, PLATEAU, seed=0, progress=False)


def test_plateau_training_stops_on_the_held_out_accuracy(plateau_result):
    history = plateau_result.history
    # colour_data is easy: validation accuracy reaches 1, the rate decays once, the next plateau ends the run
    assert plateau_result.stopped == "plateau" and len(history) < PLATEAU.epochs
    assert train_module.plateau_state(history, PLATEAU).done
    assert not train_module.plateau_state(history[:-1], PLATEAU).done
    assert all(h["validation_loss"] > 0 for h in history)
    rates = [h["learning_rate"] for h in history]
    # the last of 4 warm-up steps (72 images trained on, batch 16), then the full rate
    assert rates[0] == pytest.approx(0.05 * 3 / 4) and rates[1] == pytest.approx(0.05)
    decayed = train_module.plateau_state(history[:-1], PLATEAU).decays
    assert rates[-1] == pytest.approx(0.05 * 0.2 ** decayed) and decayed == 1
    assert plateau_result.test_accuracy > 0.9


def test_plateau_holds_out_images_it_never_trains_on(model, data, monkeypatch):
    seen = []
    step = train_module._train_step
    monkeypatch.setattr(train_module, "_train_step",
                        lambda state, images, *a, **k: seen.append(images.shape[0]) or step(state, images, *a, **k))
    models.train(model, *data, dataclasses.replace(PLATEAU, epochs=2), seed=0, progress=False)
    assert set(seen) == {72}


def test_resumed_plateau_run_equals_uninterrupted_run(model, data, plateau_result, tmp_path):
    run = functools.partial(models.train, model, *data, PLATEAU, seed=0, checkpoint_dir=tmp_path, progress=False)
    first = run(epochs=2)
    assert first.stopped == "epochs" and len(first.history) == 2
    resumed = run()
    assert resumed.history == plateau_result.history and resumed.stopped == "plateau"
    assert_trees_equal(resumed.variables, plateau_result.variables)


@pytest.mark.parametrize("change, message", [
    (dict(patience=0), "patience must be at least 1"),
    (dict(validation_fraction=1.0), "validation_fraction must lie in \\(0, 1\\)"),
    (dict(lr_decay_factor=1.5), "lr_decay_factor must lie in \\(0, 1\\)"),
    (dict(max_decays=-1), "max_decays and min_delta"),
])
def test_bad_plateau_configs(change, message):
    with pytest.raises(ValueError, match=message):
        dataclasses.replace(PLATEAU, **change)


def test_save_and_load_model(model, data, result, tmp_path):
    metadata = {
        "dataset": "colour_data",
        "test_accuracy": result.test_accuracy,
        "seed": 0,
        "config": dataclasses.asdict(CONFIG),
    }
    save = functools.partial(models.save_model, model_name="resnet18", model_kwargs=MODEL_KWARGS)
    save(tmp_path / "net", variables=result.variables, metadata=metadata)
    loaded, variables, loaded_metadata = models.load_model(tmp_path / "net")
    assert loaded == model
    assert loaded_metadata == json.loads(json.dumps(metadata))
    assert_trees_equal(variables, result.variables)
    images = data[2]
    np.testing.assert_array_equal(
        logits(loaded, variables, images), logits(model, result.variables, images)
    )
    with pytest.raises(ValueError, match="test_accuracy"):
        save(tmp_path / "x", variables=result.variables, metadata={"dataset": "colour_data"})


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda d: (d[0][:-1], *d[1:]), "train_images has 95 images but train_labels has 96"),
        (lambda d: (d[0][..., 0], *d[1:]), "train_images must be \\(N, H, W, C\\)"),
        (lambda d: (*d[:3], d[3] + 1), "test_labels must lie in \\[0, 3\\)"),
        (lambda d: (*d[:3], d[3].astype(np.float32)), "test_labels must be a 1-d integer"),
        (lambda d: (d[0] * 255, *d[1:]), "train_images must lie in \\[0, 1\\]"),
        (lambda d: (*d[:2], d[2][:, :4], d[3]), "test_images must have the train images'"),
    ],
)
def test_bad_inputs_name_the_argument(model, data, change, message):
    with pytest.raises(ValueError, match=message):
        models.train(model, *change(data), CONFIG, seed=0, progress=False)


def test_bad_epochs_and_configs(model, data):
    with pytest.raises(ValueError, match="epochs must lie in \\[1, config.epochs=3\\]"):
        models.train(model, *data, CONFIG, seed=0, epochs=4, progress=False)
    with pytest.raises(ValueError, match="batch_size=128 exceeds the 96 train images"):
        models.train(model, *data, models.TrainConfig(epochs=3), seed=0, progress=False)
    with pytest.raises(ValueError, match="schedule"):
        models.TrainConfig(schedule="linear")
    with pytest.raises(ValueError, match="warmup_epochs"):
        models.TrainConfig(epochs=2, warmup_epochs=2)


def test_authors_recipe():
    config = models.TrainConfig.authors()
    assert (config.epochs, config.batch_size, config.momentum) == (100, 64, 0.9)
    assert (config.nesterov, config.weight_decay, config.schedule) == (False, 5e-4, "step")
    assert (config.crop_padding, config.flip, config.max_rotation) == (4, True, 15.0)
    learning_rate = train_module._learning_rate(config, steps_per_epoch=10)
    steps = [0, 299, 300, 599, 600, 899, 900, 999]  # epoch 31 starts at step 300
    expected = [0.1, 0.1, 0.02, 0.02, 0.004, 0.004, 0.0008, 0.0008]
    np.testing.assert_allclose([learning_rate(s) for s in steps], expected, rtol=1e-6)


def test_augment():
    images = jax.random.uniform(jax.random.key(0), (64, 6, 6, 2), jnp.float32)
    key = jax.random.key(1)
    plain = models.TrainConfig(crop_padding=0, flip=False)
    augment = jax.jit(train_module.augment, static_argnums=2)

    flipped = augment(images, key, dataclasses.replace(plain, flip=True))
    same = jnp.all(flipped == images, axis=(1, 2, 3))
    mirrored = jnp.all(flipped == images[:, :, ::-1], axis=(1, 2, 3))
    assert jnp.all(same | mirrored) and 10 < jnp.sum(mirrored) < 54

    cropped = augment(images, key, dataclasses.replace(plain, crop_padding=2))
    padded = np.pad(images, ((0, 0), (2, 2), (2, 2), (0, 0)))
    windows = {(y, x) for y in range(5) for x in range(5)}
    for image, crop in zip(padded, np.asarray(cropped)):
        assert any(np.array_equal(image[y : y + 6, x : x + 6], crop) for y, x in windows)

    quarter = train_module._rotate(images[0], jnp.float32(np.pi / 2))
    np.testing.assert_array_equal(quarter, np.rot90(images[0], k=-1, axes=(0, 1)))
    rotated = augment(images, key, dataclasses.replace(plain, max_rotation=15.0))
    assert rotated.shape == images.shape and not jnp.array_equal(rotated, images)
