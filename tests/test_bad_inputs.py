"""Bad inputs across the API and the command line: each is refused at the boundary with the right
exception type and a message naming the offending argument (issue 16, "nothing misleading")."""
import contextlib
import io
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxnmf
import models
from experiments import quickstart
from experiments.matrices import build_blocks
from models.train import TrainConfig

sys.path.insert(0, os.path.dirname(__file__))
from tiny_data import colour_data  # noqa: E402

RNG = np.random.default_rng(0)
X = {"a": RNG.random((6, 10)), "b": RNG.random((4, 10))}
KEY = jax.random.key(0)
W_OK = {"a": np.ones((6, 3)), "b": np.ones((4, 3))}


def fit(**kw):
    blocks, rank = kw.pop("blocks", X), kw.pop("rank", 3)
    return lambda: jaxnmf.fit(blocks, rank, **{"key": KEY, "max_iter": 5, **kw})


FIT_CASES = [
    pytest.param(fit(key=None), TypeError, r"^key", id="fit-key-None"),
    pytest.param(fit(key=0), TypeError, r"^key", id="fit-key-int"),
    pytest.param(fit(unit_columns="no"), TypeError, r"^unit_columns", id="fit-unit_columns-str"),
    pytest.param(fit(tol="x"), TypeError, r"^tol", id="fit-tol-str"),
    pytest.param(fit(tol=float("nan")), ValueError, r"^tol", id="fit-tol-nan"),
    pytest.param(fit(rank=0), ValueError, r"^rank", id="fit-rank-0"),
    pytest.param(fit(rank=11), ValueError, r"^rank 11", id="fit-rank-too-big"),
    pytest.param(fit(rank=2.0), TypeError, r"^rank", id="fit-rank-float"),
    pytest.param(fit(max_iter=0), ValueError, r"^max_iter", id="fit-max_iter-0"),
    pytest.param(fit(blocks={"a": -X["a"], "b": X["b"]}), ValueError, r"^block 'a' has negative", id="fit-negative"),
    pytest.param(fit(blocks={"a": X["a"] * np.nan, "b": X["b"]}), ValueError, r"^block 'a' contains NaN",
                 id="fit-nan-block"),
    pytest.param(fit(blocks={"a": X["a"], "b": X["b"][:, :5]}), ValueError, r"^block 'b' has 5 columns",
                 id="fit-mismatched-N"),
    pytest.param(fit(blocks={}), ValueError, r"^blocks is empty", id="fit-empty-dict"),
    pytest.param(fit(l2=-1.0), ValueError, r"^l2 must be >= 0", id="fit-l2-negative"),
    pytest.param(fit(l2=np.nan), ValueError, r"^l2 must be finite", id="fit-l2-nan"),
    pytest.param(fit(l2=[1.0, 2.0, 3.0]), ValueError, r"^l2 has 3 values for 2 blocks", id="fit-l2-length"),
    pytest.param(fit(l1=-1.0), ValueError, r"^l1 must be >= 0", id="fit-l1-negative"),
    pytest.param(fit(l1=np.nan), ValueError, r"^l1 must be finite", id="fit-l1-nan"),
    pytest.param(fit(l1=[1.0]), ValueError, r"^l1 has 1 values", id="fit-l1-length"),
    pytest.param(fit(l2_F="big"), TypeError, r"^l2_F", id="fit-l2_F-str"),
    pytest.param(fit(block_weights="frob"), ValueError, r"^block_weights", id="fit-block_weights-str"),
    pytest.param(fit(block_weights=[1.0, -1.0]), ValueError, r"^block_weights must be positive",
                 id="fit-block_weights-negative"),
    pytest.param(fit(init=(np.ones((3, 9)), W_OK)), ValueError, r"^init F0 has shape", id="fit-init-F-shape"),
    pytest.param(fit(init=(np.ones((3, 10)), {"a": np.ones((6, 2)), "b": np.ones((4, 3))})), ValueError,
                 r"^init factor of block 'a'", id="fit-init-W-shape"),
    pytest.param(fit(init=(np.zeros((3, 10)), W_OK)), ValueError, r"^init: F0 is all zero", id="fit-init-zero-F-mu"),
    pytest.param(fit(n_restarts=0), ValueError, r"^n_restarts", id="fit-n_restarts-0"),
    pytest.param(fit(solver="x"), ValueError, r"^solver", id="fit-solver"),
    pytest.param(fit(example_groups=np.zeros(9, int)), ValueError, r"^example_groups must be \(N,\)",
                 id="fit-groups-length"),
    pytest.param(fit(example_groups=-np.ones(10, int)), ValueError, r"^example_groups must be >= 0",
                 id="fit-groups-negative"),
    pytest.param(fit(one_pass="no"), TypeError, r"^one_pass", id="fit-one_pass-str"),
]

_R = jaxnmf.fit(X, 3, key=KEY, max_iter=5, dtype=jnp.float64)


def obj(blocks=X, F=_R.F, factors=_R.factors):
    return lambda: jaxnmf.objective(blocks, F, factors)


OBJECTIVE_CASES = [
    pytest.param(obj(F=_R.F[:, :5]), ValueError, r"^F must be \(rank, N\)", id="objective-F-columns"),
    pytest.param(obj(F=_R.F[0]), ValueError, r"^F must be \(rank, N\)", id="objective-F-1d"),
    pytest.param(obj(F=_R.F[:2]), ValueError, r"^factors: block 'a' has shape \(6, 3\)", id="objective-rank"),
    pytest.param(obj(F=np.ones((3, 10), int)), TypeError, r"^F must be float32 or float64", id="objective-F-int"),
    pytest.param(obj(F=np.ones((3, 10), complex)), TypeError, r"^F must be float32 or float64",
                 id="objective-F-complex"),
    pytest.param(obj(blocks={"a": X["a"] * np.nan, "b": X["b"]}), ValueError, r"^block 'a' contains NaN",
                 id="objective-nan-block"),
    pytest.param(obj(F=-_R.F), ValueError, r"^F must be non-negative", id="objective-negative-F"),
    pytest.param(obj(factors={"a": _R.factors["a"]}), ValueError, r"^factors have blocks",
                 id="objective-factor-names"),
]

TRANSFORM_CASES = [
    pytest.param(lambda: jaxnmf.transform({"F": 1}, X), TypeError, r"^result must be the NMFResult",
                 id="transform-not-result"),
    pytest.param(lambda: jaxnmf.transform(_R, {"a": X["a"], "c": X["b"]}), ValueError, r"^new_blocks",
                 id="transform-other-names"),
    pytest.param(lambda: jaxnmf.transform(_R, {"a": X["a"][:5], "b": X["b"]}), ValueError,
                 r"^block 'a' of new_blocks has 5 rows", id="transform-other-rows"),
    pytest.param(lambda: jaxnmf.transform(_R, {"a": X["a"] * np.nan, "b": X["b"]}), ValueError,
                 r"^block 'a' contains NaN", id="transform-nan"),
]

TRAIN_CONFIG_CASES = [
    pytest.param(lambda: TrainConfig(learning_rate=float("nan")), ValueError, r"^learning_rate must be finite",
                 id="TrainConfig-lr-nan"),
    pytest.param(lambda: TrainConfig(learning_rate=-0.1), ValueError, r"^learning_rate must be > 0",
                 id="TrainConfig-lr-negative"),
    pytest.param(lambda: TrainConfig(learning_rate=float("inf")), ValueError, r"^learning_rate must be finite",
                 id="TrainConfig-lr-inf"),
    pytest.param(lambda: TrainConfig(momentum=1.5), ValueError, r"^momentum must lie in \[0, 1\)",
                 id="TrainConfig-momentum-1.5"),
    pytest.param(lambda: TrainConfig(momentum=-0.1), ValueError, r"^momentum", id="TrainConfig-momentum-negative"),
    pytest.param(lambda: TrainConfig(epochs=0), ValueError, r"^epochs must be at least 1", id="TrainConfig-epochs-0"),
    pytest.param(lambda: TrainConfig(batch_size=0), ValueError, r"^batch_size", id="TrainConfig-batch_size-0"),
    pytest.param(lambda: TrainConfig(weight_decay=-1e-4), ValueError, r"^weight_decay must be >= 0",
                 id="TrainConfig-weight_decay-negative"),
    pytest.param(lambda: TrainConfig(epochs=2.5), TypeError, r"^epochs must be an int", id="TrainConfig-epochs-float"),
]

TINY = models.build_model("resnet18", num_classes=3, width=2)
TINY_VARIABLES = models.init_variables(TINY, jax.random.key(0), (1, 8, 8, 3))
TRAIN_X, TRAIN_Y = colour_data(16, 0)
TEST_X, TEST_Y = colour_data(8, 1)
TINY_CONFIG = TrainConfig(epochs=1, batch_size=8, warmup_epochs=0, crop_padding=0, flip=False)


def train(**kw):
    return lambda: models.train(TINY, TRAIN_X, TRAIN_Y, TEST_X, TEST_Y, kw.pop("config", TINY_CONFIG),
                                **{"seed": 0, "progress": False, **kw})


def stage3(images):
    return models.capture_activations(TINY, TINY_VARIABLES, images, ["stage3"])


MODEL_CASES = [
    pytest.param(train(seed=1.5), TypeError, r"^seed must be an int", id="train-seed-float"),
    pytest.param(train(config={"epochs": 1}), TypeError, r"^config must be a models.TrainConfig", id="train-config-dict"),
    pytest.param(lambda: models.capture_activations(TINY, TINY_VARIABLES, np.zeros((2, 8, 8, 1), np.float32),
                                                    ["stage3"]),
                 ValueError, r"^images of shape \(2, 8, 8, 1\) do not fit", id="capture-1-channel"),
    pytest.param(lambda: models.capture_activations(TINY, TINY_VARIABLES, np.zeros((2, 8, 8, 3), np.float32),
                                                    ["stage9"]),
                 ValueError, r"^unknown layer 'stage9'.*valid: .*'stage3'", id="capture-unknown-layer"),
    pytest.param(lambda: build_blocks(TRAIN_X, stage3, ["stage3"], batch_size=2.5, progress=False), ValueError,
                 r"^batch_size", id="build_blocks-batch_size-float"),
    pytest.param(lambda: build_blocks(TRAIN_X, None, ["stage3"], progress=False), TypeError, r"^activation_fn",
                 id="build_blocks-activation_fn-None"),
    pytest.param(lambda: build_blocks(TRAIN_X, lambda x: x, ["stage3"], progress=False), TypeError,
                 r"^activation_fn: expected it to return a mapping", id="build_blocks-activation_fn-array"),
    pytest.param(lambda: build_blocks(TRAIN_X[..., :1], stage3, ["stage3"], progress=False), ValueError,
                 r"^images of shape", id="build_blocks-1-channel"),
]


@pytest.mark.parametrize("call, error, message", FIT_CASES + OBJECTIVE_CASES + TRANSFORM_CASES
                         + TRAIN_CONFIG_CASES + MODEL_CASES)
def test_api_refuses(call, error, message):
    with pytest.raises(error, match=message):
        call()


def test_train_refuses_a_checkpoint_dir_that_is_a_file_before_any_epoch(tmp_path, monkeypatch):
    train_module = sys.modules["models.train"]  # ``models.train`` is the function

    def no_epoch(*args, **kwargs):
        raise AssertionError("an epoch ran")

    monkeypatch.setattr(train_module, "_train_step", no_epoch)
    (tmp_path / "file").write_text("x")
    for where, message in ((tmp_path / "file", r"is a file"), (tmp_path / "file" / "sub", r"lies under the file")):
        with pytest.raises(ValueError, match=r"^checkpoint_dir .*" + message):
            train(checkpoint_dir=where)()


# --- command line ---------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def saved_model(tmp_path_factory):
    """An untrained width-4 ResNet-18 saved as the CLI's --model-path expects (no training needed)."""
    path = tmp_path_factory.mktemp("saved") / "model"
    model = models.build_model("resnet18", num_classes=4, width=4)
    variables = models.init_variables(model, jax.random.key(0), (1, 32, 32, 3))
    models.save_model(path, "resnet18", dict(num_classes=4, width=4), variables,
                      dict(dataset="untrained", test_accuracy=0.0))
    return path


def cli_error(argv) -> str:
    """The last line quickstart prints when it refuses ``argv`` (it must exit 2, before any work)."""
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()), \
            pytest.raises(SystemExit) as info:
        quickstart.main(argv)
    assert info.value.code == 2
    return err.getvalue()


CLI_CASES = [
    pytest.param(lambda t, m: ["--out", f"{t}/file/run"], r"error: --out: .* lies under the file", id="cli-out-under-file"),
    pytest.param(lambda t, m: ["--out", "/proc/jaxnmf-run"], r"error: --out: cannot write in /proc",
                 id="cli-out-unwritable"),
    pytest.param(lambda t, m: ["--out", f"{t}/o", "--model-path", m, "--model", "vgg11"],
                 r"error: --model-path: .* holds a resnet18 of width 4, but .*--model vgg11", id="cli-model-conflict"),
    pytest.param(lambda t, m: ["--out", f"{t}/o", "--model-path", m, "--width", "16"],
                 r"error: --model-path: .* pass --model resnet18 --width 4", id="cli-width-conflict"),
    pytest.param(lambda t, m: ["--out", f"{t}/o", "--l2", "inf"], r"error: --l2: must be a finite number",
                 id="cli-l2-inf"),
    pytest.param(lambda t, m: ["--out", f"{t}/o", "--group-F", "nan"], r"error: --group-F: must be a finite",
                 id="cli-group_F-nan"),
    pytest.param(lambda t, m: ["--smoke", "--out", f"{t}/o", "--rank", "50"], r"error: --rank: --smoke overrides",
                 id="cli-smoke-rank"),
    pytest.param(lambda t, m: ["--out", f"{t}/o", "--layers", "stage9"],
                 r"error: --layers: unknown layer 'stage9' for resnet18; valid: .*stage3", id="cli-unknown-layer"),
    pytest.param(lambda t, m: ["--out", f"{t}/o", "--devices", "0"], r"error: --devices: must be a whole number >= 1",
                 id="cli-devices-0"),
    pytest.param(lambda t, m: ["--out", f"{t}/o", "--devices", "64"],
                 r"error: --devices: 64 asked for, but JAX sees 1 cpu device.*xla_force_host_platform_device_count",
                 id="cli-devices-too-many"),
]


@pytest.mark.parametrize("argv, message", CLI_CASES)
def test_cli_refuses_before_any_work(argv, message, tmp_path, saved_model):
    (tmp_path / "file").write_text("x")
    text = cli_error(argv(tmp_path, str(saved_model)))
    assert __import__("re").search(message, text), text
    assert not (tmp_path / "o").exists()  # refused before the run folder was claimed


def test_cli_missing_cifar_is_one_short_message(tmp_path, monkeypatch):
    """No download is attempted (TensorFlow is not installed in tests; download is switched off here
    anyway) and the error is a few lines naming how to prepare the data, not a chained traceback."""
    from experiments import data
    monkeypatch.setattr(data, "_has_tensorflow", lambda: False)
    text = cli_error(["--smoke", "--out", str(tmp_path / "o"), "--dataset", "cifar10",
                      "--data-dir", str(tmp_path / "tfds")])
    assert "error: --dataset cifar10" in text and "pip install -e '.[cifar]'" in text and "load_cifar" in text
    assert "Traceback" not in text and len(text.splitlines()) <= 6, text
