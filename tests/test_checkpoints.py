"""Damaged checkpoints and saved models: `models.train` falls back to the previous checkpoint
with a warning, or stops with one clear error; `models.load_model` refuses a damaged model."""
import importlib
import os
import re
import shutil

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

import models
from tiny_data import colour_data

train_module = importlib.import_module("models.train")

# orbax leaves the errors of its reads of a damaged file in background futures nobody awaits
pytestmark = pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")

# A ResNet of two one-block stages, width 2, on 8x8 images, trained for 2 epochs of 3 steps.
MODEL_KWARGS = {"num_classes": 3, "width": 2, "stage_sizes": (1, 1)}
CONFIG = models.TrainConfig(epochs=2, batch_size=16, learning_rate=0.05, warmup_epochs=0)


DATA = (*colour_data(48, seed=0), *colour_data(20, seed=1))


@pytest.fixture(scope="module")
def model():
    return models.build_model("resnet18", **MODEL_KWARGS)


def train(model, checkpoint_dir):
    return models.train(model, *DATA, CONFIG, seed=0, checkpoint_dir=checkpoint_dir, progress=False)


@pytest.fixture(scope="module")
def reference(model, tmp_path_factory):
    """An uninterrupted run and its checkpoint folder (epochs 1 and 2)."""
    folder = tmp_path_factory.mktemp("reference") / "checkpoints"
    return train(model, folder), folder


@pytest.fixture
def checkpoints(reference, tmp_path):
    """A copy of the reference run's checkpoint folder, to damage."""
    return shutil.copytree(reference[1], tmp_path / "checkpoints")


def files(folder):
    return [os.path.join(root, name) for root, _, names in os.walk(folder) for name in names]


def truncate(path):
    with open(path, "r+b") as f:
        f.truncate(os.path.getsize(path) // 2)


def random_bytes(path):
    size = os.path.getsize(path)
    with open(path, "wb") as f:
        f.write(np.random.default_rng(0).bytes(size))


def rewrite(model, folder, step, change_state=lambda state: state, change_meta=lambda meta: meta):
    """Replace checkpoint ``step`` by one whose state and metadata went through the changes."""
    variables = models.init_variables(model, jax.random.key(0), (1, 8, 8, 3))
    tx = train_module._optimizer(CONFIG, steps_per_epoch=3)
    fresh = train_module._TrainState(variables["params"], variables["batch_stats"], tx.init(variables["params"]))
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, fresh)
    manager = ocp.CheckpointManager(os.path.abspath(folder), options=ocp.CheckpointManagerOptions(max_to_keep=2))
    restored = manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract), meta=ocp.args.JsonRestore()))
    manager.delete(step)
    manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(change_state(restored.state)),
                                               meta=ocp.args.JsonSave(change_meta(restored.meta))))
    manager.wait_until_finished()
    manager.close()


def nan_head(state):
    params = jax.tree.map(np.asarray, state.params)
    params["head"]["kernel"] = np.full_like(params["head"]["kernel"], np.nan)
    return state._replace(params=params)


def narrow_head(state):
    params = jax.tree.map(np.asarray, state.params)
    params["head"]["kernel"] = params["head"]["kernel"][:1]
    return state._replace(params=params)


DAMAGES = {
    "largest file truncated": lambda model, step: truncate(max(files(step), key=os.path.getsize)),
    "array data overwritten with random bytes": lambda model, step: [
        random_bytes(path) for path in files(step / "state") if f"{os.sep}d{os.sep}" in path],
    "metadata JSON truncated": lambda model, step: truncate(step / "meta" / "metadata"),
    "NaN weights": lambda model, step: rewrite(model, step.parent, 2, change_state=nan_head),
    "a weight of another shape": lambda model, step: rewrite(model, step.parent, 2, change_state=narrow_head),
}


def assert_one_error(error):
    """The error is shown alone: no chained traceback of the errors behind it."""
    assert error.__cause__ is None and (error.__context__ is None or error.__suppress_context__)


def assert_same_finite_variables(a, b):
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        assert np.all(np.isfinite(x))
        np.testing.assert_array_equal(x, y)


@pytest.mark.parametrize("damage", list(DAMAGES))
def test_a_damaged_last_checkpoint_falls_back_to_the_previous_one(model, reference, checkpoints, damage):
    DAMAGES[damage](model, checkpoints / "2")
    with pytest.warns(RuntimeWarning, match=re.escape(str(checkpoints)) + ".*epoch 2 is unusable.*"
                                             "resuming from epoch 1"):
        resumed = train(model, checkpoints)
    # epoch 2 trained again from epoch 1's state: the run as it was, never NaN weights
    assert_same_finite_variables(resumed.variables, reference[0].variables)
    assert resumed.history == reference[0].history
    again = train(model, checkpoints)  # the new checkpoint of epoch 2 is whole
    assert_same_finite_variables(again.variables, reference[0].variables)


def test_no_usable_checkpoint_is_one_clear_error(model, checkpoints):
    truncate(checkpoints / "2" / "meta" / "metadata")
    random_bytes(max(files(checkpoints / "1"), key=os.path.getsize))
    with pytest.raises(ValueError, match=re.escape(f"checkpoint_dir {checkpoints} holds no usable checkpoint")
                       ) as error:
        train(model, checkpoints)
    message = str(error.value)
    assert "epoch 2: unreadable metadata" in message and "epoch 1: unreadable arrays" in message
    assert len(message) < 800
    assert_one_error(error.value)


def test_accuracy_is_measured_not_read_from_the_checkpoint(model, reference, checkpoints):
    def wrong_accuracy(meta):
        meta["history"][-1]["test_accuracy"] = -1.0
        return meta

    rewrite(model, checkpoints, 2, change_meta=wrong_accuracy)
    done = train(model, checkpoints)  # nothing left to train
    assert done.history[-1]["test_accuracy"] == -1.0
    assert done.test_accuracy == reference[0].test_accuracy >= 0


@pytest.fixture
def saved_model(model, reference, tmp_path):
    path = tmp_path / "net"
    models.save_model(path, "resnet18", MODEL_KWARGS, reference[0].variables,
                      {"dataset": "colour_data", "test_accuracy": reference[0].test_accuracy})
    assert not [name for name in os.listdir(path) if name.endswith(".tmp")]
    return path


@pytest.mark.parametrize("damage", ["model.json truncated", "variables truncated"])
def test_load_model_names_the_folder_of_a_damaged_model(saved_model, damage):
    if damage == "model.json truncated":
        truncate(saved_model / "model.json")
    else:
        truncate(max(files(saved_model / "variables"), key=os.path.getsize))
    with pytest.raises(ValueError, match=re.escape(f"{saved_model} holds no readable saved model")) as error:
        models.load_model(saved_model)
    assert_one_error(error.value)


def test_load_model_refuses_non_finite_variables(model, reference, tmp_path):
    variables = jax.tree.map(np.asarray, reference[0].variables)
    variables["params"]["head"]["bias"] = np.full_like(variables["params"]["head"]["bias"], np.inf)
    models.save_model(tmp_path / "net", "resnet18", MODEL_KWARGS, variables,
                      {"dataset": "colour_data", "test_accuracy": 0.5})
    with pytest.raises(ValueError, match=re.escape(f"{tmp_path / 'net'}: the saved model's ") + ".*head.*bias.*NaN"):
        models.load_model(tmp_path / "net")
