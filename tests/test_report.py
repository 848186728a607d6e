"""The report folder of a tiny synthetic run: files, summary.json, factors.npz, report.html."""
import base64
import io
import json
import re
from html import escape as html_escape
from types import SimpleNamespace

import matplotlib.image
import numpy as np
import pytest
from matplotlib.figure import Figure

from experiments.report import Section, write_report
from jaxnmf.analysis import (
    attribute_auc,
    factor_table,
    mean_top_eigenvalues,
    nearest_neighbours,
    neighbour_factor_distribution,
    neuron_similarity,
    similarity_eigenvalues,
)

D, N, M = 4, 40, 60  # factors, probe images, dataset images
CLASS_NAMES = ("cat", "dog", "ship")
RGB = ("pixels_r", "pixels_g", "pixels_b")


def _dataset(channels: int, rich: bool):
    rng = np.random.default_rng(0)
    return SimpleNamespace(
        images=rng.uniform(size=(M, 32, 32, channels)).astype(np.float32),
        labels=rng.integers(0, 3, size=M),
        class_names=CLASS_NAMES,
        superlabels=rng.integers(0, 2, size=M) if rich else None,
        superclass_names=("animal", "vehicle") if rich else None,
        attributes={"colour": rng.integers(0, 2, size=M)} if rich else {},
        attribute_names={"colour": ("red", "blue")} if rich else {},
    )


def _result(pixel_blocks, layer_rows, n_restarts: int):
    rng = np.random.default_rng(1)
    F = rng.uniform(size=(D, N))
    F[2] *= 3.0                       # factor 2 has the largest mass ...
    F[2, 17] = 10.0                   # ... and its top image is probe image 17
    factors = {b: rng.uniform(size=(32 * 32, D)) for b in pixel_blocks}
    factors.update({b: rng.uniform(size=(rows, D)) for b, rows in layer_rows.items()})
    losses = np.geomspace(100.0, 10.0, 25)
    return SimpleNamespace(
        F=F, factors=factors, losses=losses, loss=10.0,
        relative_errors={b: 0.1 + 0.01 * i for i, b in enumerate(factors)},
        n_iter=25, converged=True, finite=True, active=np.ones(D, bool), n_active=D,
        restart_losses=10.0 + np.arange(n_restarts, dtype=float))


def _tcav_section():
    fig = Figure()
    ax = fig.subplots()
    ax.imshow(np.eye(3))
    return Section("TCAV", "<p>TCAV scores per class.</p>", {"tcav": fig},
                   {"score": np.float32(0.5)})


def _strict_json(path):
    def refuse(constant):
        raise AssertionError(f"summary.json holds {constant}")
    return json.loads(path.read_text(), parse_constant=refuse)


PROBE = np.random.default_rng(2).permutation(M)[:N]
CONFIG = {"model": "resnet18", "rank": np.int64(D), "block_weights": "frobenius",
          "variant": "authors", "layers": ("stage3", "pool"), "lam_F": 1.0}


@pytest.fixture(scope="module")
def rgb_report(tmp_path_factory):
    dataset = _dataset(3, rich=True)
    result = _result(RGB, {"stage3": 50, "pool": 8}, n_restarts=3)
    out = tmp_path_factory.mktemp("rgb") / "run"
    path = write_report(out, config=CONFIG, dataset=dataset, probe_indices=PROBE, result=result,
                        pixel_blocks=RGB, layer_blocks=["stage3", "pool"], top_eig_k=2,
                        n_neighbours=10, extra_sections=[_tcav_section()],
                        notes=["A note for the reader."])
    return SimpleNamespace(path=path, out=out, dataset=dataset, result=result)


def test_folder_holds_report_summary_factors_and_figures(rgb_report):
    assert rgb_report.path == rgb_report.out / "report.html"
    summary = _strict_json(rgb_report.out / "summary.json")
    assert set(summary["figures"]) == {
        f"{name}.png" for name in ("objective", "restarts", "top_images", "neuron_similarity",
                                   "eigenvalues", "mean_top_eigenvalues", "pixels", "neighbours",
                                   "extra_tcav")}
    for name in summary["figures"]:
        assert (rgb_report.out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert {p.name for p in rgb_report.out.iterdir()} == (
        set(summary["figures"]) | {"report.html", "summary.json", "factors.npz"})


def test_summary_numbers_match_the_inputs(rgb_report):
    summary = _strict_json(rgb_report.out / "summary.json")
    result, dataset = rgb_report.result, rgb_report.dataset
    labels = dataset.labels[PROBE]
    assert summary["config"] == {**CONFIG, "rank": D, "layers": ["stage3", "pool"]}
    assert summary["notes"] == ["A note for the reader."]
    data = summary["data"]
    assert (data["dataset_size"], data["n_probe"], data["rank"]) == (M, N, D)
    assert data["image_shape"] == [32, 32, 3]
    assert data["blocks"]["stage3"] == {"rows": 50, "kind": "activations"}
    assert data["blocks"]["pixels_g"] == {"rows": 1024, "kind": "pixels"}

    fit = summary["fit"]
    assert fit["loss"] == 10.0 and fit["n_iter"] == 25 and fit["converged"] is True
    assert fit["relative_errors"] == pytest.approx(result.relative_errors)
    np.testing.assert_allclose(fit["losses"], result.losses)
    assert fit["restart_spread"] == pytest.approx(
        {"n_restarts": 3, "best": 10.0, "median": 11.0, "worst": 12.0, "relative_spread": 0.2})

    expected = factor_table(result.F, labels, CLASS_NAMES, dataset.superlabels[PROBE],
                            dataset.superclass_names)
    assert summary["factor_table"] == json.loads(json.dumps(expected))
    assert len(summary["factor_table"][0]["top_images"]) == N // 10

    layers = summary["neurons"]["layers"]
    assert summary["neurons"]["top_eig_k"] == 2 and list(layers) == ["stage3", "pool"]
    for layer in ("stage3", "pool"):
        S = neuron_similarity(result.factors[layer])
        np.testing.assert_allclose(layers[layer]["eigenvalues"], similarity_eigenvalues(S))
        assert layers[layer]["mean_top_k"] == pytest.approx(mean_top_eigenvalues(S, 2))

    neighbours = summary["neighbours"]
    assert neighbours["image"] == 17 and neighbours["dataset_index"] == PROBE[17]
    assert neighbours["dominant_factor"] == 2
    np.testing.assert_array_equal(neighbours["neighbours"], nearest_neighbours(result.F, 17, 10))
    np.testing.assert_allclose(neighbours["distribution"],
                               neighbour_factor_distribution(result.F, neighbours["neighbours"]))

    aucs = attribute_auc(result.F, {"class": labels, "colour": dataset.attributes["colour"][PROBE]})
    assert set(summary["attribute_auc"]) == {"class", "colour"}
    for value, (k, auc) in aucs["colour"]["values"].items():
        name = dataset.attribute_names["colour"][value]
        assert summary["attribute_auc"]["colour"]["values"][name] == {"factor": k, "auc": auc}
    assert summary["attribute_auc"]["class"]["mean"] == pytest.approx(aucs["class"]["mean"])
    assert summary["extra_sections"] == {"TCAV": {"score": 0.5}}


def test_factors_npz_round_trips(rgb_report):
    result, dataset = rgb_report.result, rgb_report.dataset
    with np.load(rgb_report.out / "factors.npz") as saved:
        assert set(saved.files) == {"F", "labels", "superlabels", "probe_indices", *result.factors}
        np.testing.assert_array_equal(saved["F"], result.F)
        for name, W in result.factors.items():
            np.testing.assert_array_equal(saved[name], W)
        np.testing.assert_array_equal(saved["labels"], dataset.labels[PROBE])
        np.testing.assert_array_equal(saved["superlabels"], dataset.superlabels[PROBE])
        np.testing.assert_array_equal(saved["probe_indices"], PROBE)


def test_html_is_self_contained_and_embeds_images(rgb_report):
    page = rgb_report.path.read_text(encoding="utf-8")
    assert not re.search(r"""(src|href)\s*=\s*["']?\s*(https?:)?//""", page, re.IGNORECASE)
    assert "<link" not in page and "<script" not in page
    sources = re.findall(r"""<img[^>]*\ssrc="([^"]*)\"""", page)
    # 8 embedded figures (all but top_images.png) and two thumbnail strips per factor (the
    # summary's and the factor table's)
    assert len(sources) == 8 + 2 * D
    for src in sources:
        assert src.startswith("data:image/png;base64,")
        assert base64.b64decode(src.split(",", 1)[1])[:4] == b"\x89PNG"
    for text in ("How to read this report", "Fit diagnostics", "Factors (Table 1)",
                 "Neurons per layer", "Pixels", "Neighbours", "Ground-truth attributes", "TCAV",
                 "frobenius", "published code", "A note for the reader.", "resnet18"):
        assert text in page


def test_thumbnails_are_upscaled(rgb_report):
    page = rgb_report.path.read_text(encoding="utf-8")
    src = re.search(r'<img class="thumbs" src="data:image/png;base64,([^"]*)"', page).group(1)
    strip = matplotlib.image.imread(io.BytesIO(base64.b64decode(src)))
    assert strip.shape[0] == 64  # 32-pixel images shown twice as large


def test_grey_run_without_layers_attributes_or_restarts(tmp_path):
    dataset = _dataset(1, rich=False)
    result = _result(("pixels",), {}, n_restarts=1)
    path = write_report(tmp_path, config={}, dataset=dataset, probe_indices=PROBE,
                        result=result, pixel_blocks=["pixels"], layer_blocks=[],
                        n_neighbours=5, neighbour_image=3)
    summary = _strict_json(tmp_path / "summary.json")
    assert set(summary["figures"]) == {"objective.png", "top_images.png", "pixels.png",
                                       "neighbours.png"}
    assert "neurons" not in summary and "attribute_auc" not in summary
    assert summary["neighbours"]["image"] == 3 and len(summary["neighbours"]["neighbours"]) == 5
    with np.load(tmp_path / "factors.npz") as saved:
        assert "superlabels" not in saved.files
    pixels = matplotlib.image.imread(tmp_path / "pixels.png")[..., :3]
    np.testing.assert_allclose(pixels[..., 0], pixels[..., 1])   # shown in grey
    np.testing.assert_allclose(pixels[..., 0], pixels[..., 2])
    page = path.read_text(encoding="utf-8")
    assert "No activation block was factorised" in page
    assert "not recorded in the configuration" in page


@pytest.mark.parametrize("change, match", [
    ({"layer_blocks": ["stage9"]}, "layer_blocks names blocks"),
    ({"pixel_blocks": ["pixels_r", "pixels_g"]}, "pixel_blocks must name 1"),
    ({"n_neighbours": N}, "n_neighbours"),
    ({"top_eig_k": D + 1}, "top_eig_k"),
    ({"probe_indices": PROBE[:-1]}, "probe_indices"),
    ({"neighbour_image": N}, "neighbour_image"),
])
def test_bad_arguments_are_refused_before_writing(tmp_path, change, match):
    arguments = dict(config={}, dataset=_dataset(3, rich=False), probe_indices=PROBE,
                     result=_result(RGB, {"stage3": 20}, n_restarts=1), pixel_blocks=RGB,
                     layer_blocks=["stage3"])
    arguments.update(change)
    with pytest.raises(ValueError, match=match):
        write_report(tmp_path / "out", **arguments)
    assert not (tmp_path / "out").exists()


def test_the_summary_at_a_glance_states_what_summary_json_holds(tmp_path):
    dataset = _dataset(3, rich=True)
    result = _result(RGB, {"stage3": 50}, n_restarts=1)
    result.converged, result.n_iter = False, 25
    result.active = np.array([True, True, True, False])
    result.n_active = 3
    red = dataset.attributes["colour"][PROBE] == 0
    result.F[1] = np.where(red, 5.0, 0.1)  # factor 1 is the colour red: AUC 1
    section = Section("TCAV", "<p>scores</p>", headline="TCAV: calibrated on its controls.",
                      concepts={"factor 1": "TCAV: raises cat at stage3"})
    config = {**CONFIG, "model_test_accuracy": 0.61, "trained_on": "shapes", "dataset": "shapes"}
    path = write_report(tmp_path, config=config, dataset=dataset, probe_indices=PROBE, result=result,
                        pixel_blocks=RGB, layer_blocks=["stage3"], top_eig_k=2, n_neighbours=10,
                        extra_sections=[section])
    page = path.read_text()
    summary = _strict_json(tmp_path / "summary.json")
    glance = summary["glance"]
    # it is the first section, and every statement is on the page as written
    first = page[page.index("<h2>At a glance</h2>"):page.index("<h2>How to read this report</h2>")]
    for statement in glance["statements"]:
        assert html_escape(statement) in first
    network, fit_line, headline = glance["statements"][0], glance["statements"][2], glance["statements"][3]
    assert glance["network"]["test_accuracy"] == summary["config"]["model_test_accuracy"] == 0.61
    assert glance["network"]["low_accuracy"] is True and "0.610" in network and "WARNING" in network
    assert summary["fit"]["converged"] is False and "did NOT converge" in fit_line and "25 iterations" in fit_line
    assert f"{summary['fit']['n_active']} of {D} concepts are active" in fit_line
    assert headline == "TCAV: calibrated on its controls."
    table = summary["factor_table"]
    total = sum(row["mass"] for row in table)
    for concept, row in zip(glance["concepts"], table):
        assert concept["factor"] == row["factor"]
        assert concept["top_classes"] == [c["name"] for c in row["top_classes"][:2]]
        assert concept["share"] == pytest.approx(row["mass"] / total)
        assert concept["active"] == summary["fit"]["active"][row["factor"]]
    assert summary["attribute_auc"]["colour"]["values"]["red"] == {"factor": 1, "auc": 1.0}
    assert glance["concepts"][1]["ground_truth"][0] == "colour red (1.00)"
    assert glance["concepts"][1]["checks"] == ["TCAV: raises cat at stage3"]
    assert glance["concepts"][0]["checks"] == [] and "(inactive)" in first


def test_a_converged_fit_of_an_accurate_network_has_no_warning(tmp_path):
    dataset = _dataset(1, rich=False)
    result = _result(("pixels",), {"pool": 8}, n_restarts=1)
    config = {**CONFIG, "model_test_accuracy": 0.97, "trained_on": "shapes"}
    write_report(tmp_path, config=config, dataset=dataset, probe_indices=PROBE, result=result,
                 pixel_blocks=("pixels",), layer_blocks=["pool"], top_eig_k=2, n_neighbours=10)
    statements = _strict_json(tmp_path / "summary.json")["glance"]["statements"]
    assert "WARNING" not in statements[0] and "converged by its own test after 25 iterations" in statements[2]
    assert len(statements) == 3  # no section added a headline
