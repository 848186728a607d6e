"""Explain your own model and images (experiments.explain, models.capture_paths, jaxnmf.heatmaps).

A small Flax CNN defined here (three conv + ReLU modules and a dense head, not one of the project's
networks) is trained for a few optax steps on tiny drawn images, written as PNG files; the command
line then explains it with and without labels, and explains new images against the saved run.
"""
import csv
import json

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from PIL import Image

import jaxnmf
import models
from experiments import explain as explain_lib
from experiments.matrices import build_blocks
from experiments.report import UNLABELLED_NOTE

SIZE, CLASSES = 16, ("square", "disc", "bar")
FAST = ["--rank", "4", "--iterations", "25"]


class ConvReLU(nn.Module):
    features: int
    strides: int = 1

    @nn.compact
    def __call__(self, x):
        return nn.relu(nn.Conv(self.features, (3, 3), strides=self.strides)(x))


class SmallCNN(nn.Module):
    num_classes: int = 3
    width: int = 6

    @nn.compact
    def __call__(self, x):
        x = ConvReLU(self.width, name="block1")(x)  # 16x16
        x = ConvReLU(self.width, 2, name="block2")(x)  # 8x8
        x = ConvReLU(2 * self.width, 2, name="block3")(x)  # 4x4
        return nn.Dense(self.num_classes, name="head")(x.mean(axis=(1, 2)))


def draw(n, seed):
    """(n, 16, 16, 3) uint8: a red square, a green disc or a blue bar at a random place; labels."""
    rng = np.random.default_rng(seed)
    labels = np.arange(n) % 3
    images = (rng.uniform(0, 0.15, (n, SIZE, SIZE, 3)) * 255).astype(np.uint8)
    yy, xx = np.mgrid[:SIZE, :SIZE]
    for i, c in enumerate(labels):
        y, x = rng.integers(3, SIZE - 3, 2)
        mask = ((abs(yy - y) <= 2) & (abs(xx - x) <= 2) if c == 0 else (yy - y) ** 2 + (xx - x) ** 2 <= 6 if c == 1
                else (abs(yy - y) <= 0) & (abs(xx - x) <= 3))
        images[i][mask, c] = 230
    return images, labels


def write_pngs(folder, images, labels=None):
    folder.mkdir(parents=True)
    for i, image in enumerate(images):
        where = folder if labels is None else folder / CLASSES[labels[i]]
        where.mkdir(exist_ok=True)
        Image.fromarray(image).save(where / f"img{i:03d}.png")
    return folder


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("explain")
    model = SmallCNN()
    train_x, train_y = draw(300, 0)
    x = jnp.asarray(train_x, jnp.float32) / 255
    variables = model.init(jax.random.key(0), x[:1])
    tx = optax.adam(0.02)
    state = tx.init(variables)

    @jax.jit
    def step(v, s):
        loss = lambda v: optax.softmax_cross_entropy_with_integer_labels(model.apply(v, x), train_y).mean()
        value, grads = jax.value_and_grad(loss)(v)
        updates, s = tx.update(grads, s)
        return optax.apply_updates(v, updates), s, value

    for _ in range(40):
        variables, state, _ = step(variables, state)
    probe_x, probe_y = draw(150, 1)
    accuracy = float(np.mean(explain_lib.predicted_classes(model, variables, probe_x / 255.0) == probe_y))
    models.save_model(root / "model", *models.model_spec(model), variables,
                      {"dataset": "drawn shapes (300 images)", "test_accuracy": accuracy, "input_shape": [16, 16, 3]})
    write_pngs(root / "flat", probe_x)
    write_pngs(root / "by_class", probe_x, probe_y)
    new_x, _ = draw(6, 2)
    write_pngs(root / "new", new_x)
    return dict(root=root, model=model, variables=variables, probe=probe_x, labels=probe_y, accuracy=accuracy)


def run_cli(*argv):
    return explain_lib.main([str(a) for a in argv])


def refused(capsys, *argv) -> str:
    with pytest.raises(SystemExit) as exit_info:
        run_cli(*argv)
    assert exit_info.value.code == 2
    return capsys.readouterr().err.split("error: ", 1)[1]  # the message, not the usage line


# ----------------------------------------------------------------------------- capture by module path
def test_capture_by_module_path_and_non_negativity(setup):
    model, variables = setup["model"], setup["variables"]
    images = jnp.asarray(setup["probe"][:4], jnp.float32) / 255
    paths = models.layer_paths(model, variables, images.shape)
    assert paths["block1"] == (16, 16, 6) and paths["block3"] == (4, 4, 12) and "block2/Conv_0" in paths
    acts = models.capture_paths(model, variables, images, ["block3", "block1", "softmax"])
    assert list(acts) == ["block3", "block1", "softmax"] and acts["block3"].shape == (4, 4, 4, 12)
    np.testing.assert_allclose(acts["softmax"], jax.nn.softmax(model.apply(variables, images)), rtol=1e-5, atol=1e-7)
    with pytest.raises(ValueError, match=r"layers: unknown layer 'nope'.*valid module paths.*'block2/Conv_0'"):
        models.capture_paths(model, variables, images, ["nope"])
    fn = models.activation_function(model, variables, ["block2/Conv_0"])
    with pytest.raises(ValueError, match=r"'block2/Conv_0' has negative values.*ReLU"):
        models.check_non_negative(fn, images, ["block2/Conv_0"])
    # a plain function is taken as it is
    fn = models.activation_function(lambda x: {"relu": jax.nn.relu(x - 0.5)}, None, ["relu"], input_shape=images.shape)
    assert fn(images)["relu"].shape == images.shape


def test_saved_custom_model_loads_back(setup):
    model, variables, meta = models.load_model(setup["root"] / "model")
    assert type(model) is SmallCNN and model.width == 6
    x = jnp.asarray(setup["probe"][:3], jnp.float32) / 255
    np.testing.assert_allclose(model.apply(variables, x), setup["model"].apply(setup["variables"], x), rtol=1e-6)


# ----------------------------------------------------------------------------- heatmaps
def test_heatmap_is_one_where_the_concept_sits_and_zero_elsewhere():
    """Concept k's neurons sit at known positions; an activation fn builds the block with
    build_blocks (so the row order is that of the pipeline), O = its columns."""
    H, W, C, d = 3, 4, 2, 3
    patterns = np.zeros((d, H, W, C), np.float32)
    patterns[0, 0, 0, :] = [1.0, 2.0]
    patterns[0, 1, 2, 1] = 0.5
    patterns[1, 2, 3, 0] = 3.0
    patterns[2, 0, 1, :] = 1.0
    patterns[2, 2, 0, 1] = 4.0
    one_hot = np.eye(d, dtype=np.float32)[:, None, None, :]  # image k -> pattern k
    fn = lambda x: {"layer": jnp.einsum("bk,khwc->bhwc", x[:, 0, 0, :], jnp.asarray(patterns))}
    O = build_blocks(one_hot, fn, ["layer"], progress=False)["layer"]  # (H*W*C, d)
    F = np.array([[2.0, 0.3, 0.0], [1.0, 0.1, 5.0], [0.5, 7.0, 1.0]])  # (d, N)
    heat = jaxnmf.concept_heatmaps(O, F, (H, W, C))
    assert heat.shape == (3, d, H, W)
    for n in range(3):
        for k in range(d):
            expected = (patterns[k].sum(-1) > 0) * (F[k, n] > 0)
            np.testing.assert_array_equal(heat[n, k], expected.astype(float))
    np.testing.assert_array_equal(jaxnmf.concept_heatmap(O, F, (H, W, C), 0, 1), heat[0, 1])
    # the same factor in (H, W, C) row order
    hwc = patterns.reshape(d, -1).T
    np.testing.assert_array_equal(jaxnmf.concept_heatmaps(hwc, F, (H, W, C), order="hwc"), heat)
    # shared positions split by contribution: two concepts on one position, weights 1 and 3
    O2 = np.array([[1.0, 3.0]])
    np.testing.assert_allclose(jaxnmf.concept_heatmaps(O2, np.ones((2, 1)), (1, 1, 1))[0, :, 0, 0], [0.25, 0.75])
    big = jaxnmf.upsample_heatmap(heat[0, 0], (6, 8))
    np.testing.assert_array_equal(big, np.kron(heat[0, 0], np.ones((2, 2))))
    smooth = jaxnmf.upsample_heatmap(heat[0, 0], (6, 8), "bilinear")
    assert smooth.shape == (6, 8) and 0 <= smooth.min() and smooth.max() <= 1
    assert jaxnmf.overlay_heatmap(np.zeros((6, 8, 1)), heat[0, 0]).shape == (6, 8, 3)
    with pytest.raises(ValueError, match="rows"):
        jaxnmf.concept_heatmaps(O, F, (H, W, 3))


# ----------------------------------------------------------------------------- the command line
@pytest.fixture(scope="module")
def unlabelled_run(setup):
    out = setup["root"] / "run_flat"
    run_cli("--images", setup["root"] / "flat", "--model", setup["root"] / "model", "--layers", "block1:avg",
            "block2", "block3", "--out", out, *FAST)
    return out


def test_unlabelled_images_give_a_complete_report(setup, unlabelled_run):
    out = unlabelled_run
    for name in ("report.html", "summary.json", "factors.npz", "fit.npz", "run.json", "explain.json",
                 "probe_images.npy", "extra_heatmaps_0.png", "extra_heatmaps_1.png", "model/model.json"):
        assert (out / name).exists(), name
    page = (out / "report.html").read_text()
    assert "predicted classes" in page and "Concept heatmaps" in page and "predicted 0" in page
    summary = json.loads((out / "summary.json").read_text())
    assert summary["config"]["labels"] == "predicted" and summary["data"]["n_probe"] == 150
    assert json.loads((out / "run.json").read_text())["complete"]
    fit = jaxnmf.load_fit(out / "fit.npz")
    assert fit.F.shape == (4, 150) and set(fit.factors) == {"pixels_r", "pixels_g", "pixels_b", "block1:avg",
                                                             "block2", "block3"}


def test_folder_labels_fill_the_factor_table(setup):
    out = setup["root"] / "run_classes"
    run_cli("--images", setup["root"] / "by_class", "--model", setup["root"] / "model", "--layers", "block3",
            "--out", out, *FAST)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["config"]["labels"] == "given"
    assert set(summary["data"]["class_names"]) == set(CLASSES)
    top = {c["name"] for row in summary["factor_table"] for c in row["top_classes"]}
    assert top <= set(CLASSES) and top
    assert "predicted classes" not in (out / "report.html").read_text()


def test_a_function_without_logits_leaves_the_class_parts_out(setup, tmp_path):
    model, variables = setup["model"], setup["variables"]
    fn = lambda x: models.capture_paths(model, variables, x, ["block2", "block3"])
    report = explain_lib.explain(fn, None, setup["probe"][:60], layers=["block3"], out=tmp_path / "fn", rank=3,
                                 iterations=20, progress=False)
    page = report.read_text()
    assert "Left out" in page and UNLABELLED_NOTE.split(",")[0] in page and "top classes (weight)" not in page
    with np.load(tmp_path / "fn" / "factors.npz") as saved:
        assert "labels" not in saved.files
    assert not (tmp_path / "fn" / "model").exists()


def test_new_images_against_a_saved_run(setup, unlabelled_run):
    report = run_cli("--run", unlabelled_run, "--images", setup["root"] / "new")
    out = unlabelled_run / "new"
    assert report == out / "report.html" and (out / "heatmaps_0.png").exists()
    with open(out / "concept_scores.csv") as f:
        rows = list(csv.reader(f))
    assert len(rows) == 7 and rows[0][:2] == ["image", "dominant_concept"] and rows[1][0] == "img000.png"
    summary = json.loads((out / "summary.json").read_text())
    F_new = np.array(summary["F"])
    fit = jaxnmf.load_fit(unlabelled_run / "fit.npz")
    x = np.stack([np.asarray(Image.open(setup["root"] / "new" / f"img{i:03d}.png")) for i in range(6)]) / 255.0
    capture = models.activation_function(setup["model"], setup["variables"], ["block1", "block2", "block3"])
    blocks = build_blocks(x.astype(np.float32), capture, ["block1:avg", "block2", "block3"], progress=False)
    np.testing.assert_allclose(F_new, np.asarray(jaxnmf.transform(fit, blocks)), rtol=1e-4, atol=1e-6)
    with np.load(unlabelled_run / "factors.npz") as saved:
        probe_F = saved["F"]
    nearest = np.argmin(np.linalg.norm(F_new.T[:, None] - probe_F.T[None], axis=-1), axis=1)
    assert [row[0] for row in summary["nearest_probe_columns"]] == nearest.tolist()


# ----------------------------------------------------------------------------- refused inputs
def test_bad_inputs_are_refused_naming_the_argument(setup, unlabelled_run, capsys, tmp_path):
    root, model = setup["root"], setup["root"] / "model"
    common = ["--model", model, "--out", tmp_path / "x", *FAST]
    err = refused(capsys, "--images", root / "flat", "--layers", "nope", *common)
    assert err.startswith("--layers:") and "'nope'" in err and "block2/Conv_0" in err
    err = refused(capsys, "--images", root / "flat", "--layers", "block2/Conv_0", *common)
    assert err.startswith("--layers:") and "negative values" in err
    err = refused(capsys, "--images", root / "flat", *common)
    assert err.startswith("--layers:") and "block3" in err
    np.save(tmp_path / "big.npy", np.zeros((5, 20, 20, 3), np.uint8))
    err = refused(capsys, "--images", tmp_path / "big.npy", "--layers", "block3", *common)
    assert err.startswith("--images:") and "20x20" in err
    np.save(tmp_path / "grey.npy", np.zeros((5, 16, 16, 1), np.float32))
    err = refused(capsys, "--images", tmp_path / "grey.npy", "--layers", "block3", *common)
    assert err.startswith("--images:") and "channels" in err
    np.save(tmp_path / "range.npy", np.full((5, 16, 16, 3), 2.0, np.float32))
    assert refused(capsys, "--images", tmp_path / "range.npy", "--layers", "block3", *common).startswith("--images:")
    broken = tmp_path / "broken"
    broken.mkdir()
    Image.fromarray(setup["probe"][0]).save(broken / "a.png")
    (broken / "b.png").write_bytes(b"not a png")
    err = refused(capsys, "--images", broken, "--layers", "block3", *common)
    assert err.startswith("--images:") and "b.png" in err
    labels = tmp_path / "labels.csv"
    labels.write_text("filename,label\n" + "".join(f"img{i:03d}.png,{i % 3}\n" for i in range(149)))
    err = refused(capsys, "--images", root / "flat", "--labels", labels, "--layers", "block3", *common)
    assert err.startswith("--labels:") and "149 labels for 150 images" in err
    other = tmp_path / "other_model"
    wide = SmallCNN(width=4)
    models.save_model(other, *models.model_spec(wide), wide.init(jax.random.key(1), jnp.zeros((1, 16, 16, 3))),
                      {"dataset": "none", "test_accuracy": None})
    err = refused(capsys, "--run", unlabelled_run, "--images", root / "new", "--model", other)
    assert err.startswith("--model:") and "fitted to" in err
    err = refused(capsys, "--images", root / "flat", "--layers", "block3", "--out", unlabelled_run, "--model", other,
                  *FAST)
    assert err.startswith("--out:") and "another run" in err
    assert refused(capsys, "--images", root / "flat", "--layers", "block3").startswith("--model:")
    assert refused(capsys, "--run", tmp_path, "--images", root / "new").startswith("--run:")
    wide_variables = models.load_model(other)[1]
    with pytest.raises(ValueError, match=r"run: .*fitted to blocks.*another model"):
        explain_lib.explain_new(unlabelled_run, setup["probe"][:3], model_or_fn=wide, variables=wide_variables)


def test_image_files_are_resized_and_labels_read_from_a_csv(setup, tmp_path):
    big = (np.random.default_rng(0).uniform(0, 1, (4, 20, 24, 3)) * 255).astype(np.uint8)
    write_pngs(tmp_path / "big", big)
    loaded = explain_lib.load_images(tmp_path / "big", size=(16, 16), channels=3)
    assert loaded.images.shape == (4, 16, 16, 3) and loaded.resized == 4 and loaded.labels is None
    expected = np.asarray(Image.fromarray(big[1]).resize((16, 16), Image.Resampling.BILINEAR)) / 255.0
    np.testing.assert_allclose(loaded.images[1], expected, atol=1e-6)
    grey = explain_lib.load_images(tmp_path / "big", channels=1)
    assert grey.images.shape == (4, 20, 24, 1)
    by_class = explain_lib.load_images(setup["root"] / "by_class")
    assert by_class.class_names == sorted(CLASSES) and by_class.names[0].startswith("bar/")
    np.testing.assert_array_equal(np.array(by_class.class_names)[by_class.labels],
                                  [name.split("/")[0] for name in by_class.names])
    table = tmp_path / "labels.csv"
    table.write_text("filename,label\nimg003.png,cat\nimg000.png,dog\nbig/img001.png,cat\nimg002.png,dog\n")
    labels, names = explain_lib.read_labels_csv(table, loaded.names)
    assert names == ["cat", "dog"] and labels.tolist() == [1, 0, 1, 0]
    table.write_text("img000.png,1\nimg001.png,1\nimg002.png,0\nimg009.png,0\n")
    with pytest.raises(ValueError, match="labels: .*img009.png"):
        explain_lib.read_labels_csv(table, loaded.names)
