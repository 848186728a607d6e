"""The main job at its smallest settings, its TCAV step, and its refusals."""
import json

import numpy as np
import pytest

import jaxnmf
from experiments import quickstart
from experiments.pipeline import RunConfig, check_config
from offline_html import assert_offline


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory):
    """One quickstart run at its smallest setting, shared by the tests that read it."""
    out = tmp_path_factory.mktemp("quickstart")
    quickstart.main(["--smoke", "--out", str(out)])
    return out


def test_offline_check_catches_every_kind_of_remote_link():
    for tag in ['<img src="https://x.org/a.png">', "<script src='//cdn.x/a.js'></script>",
                '<link href="http://x/a.css">']:
        with pytest.raises(AssertionError):
            assert_offline(f"<html><body>{tag}</body></html>")
    assert_offline('<html><body><img src="data:image/png;base64,AAAA"></body></html>')


def test_quickstart_smoke_writes_a_complete_report(smoke_run):
    tmp_path = smoke_run
    page = (tmp_path / "report.html").read_text()
    assert "data:image/png;base64," in page
    assert_offline(page)
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["config"]["dataset"] == "shapes" and summary["data"]["n_probe"] == 96
    assert len(summary["factor_table"]) == 4
    assert set(summary["attribute_auc"]) >= {"shape", "colour", "position", "size", "background"}
    factors = np.load(tmp_path / "factors.npz")
    assert factors["F"].shape == (4, 96)
    assert factors["stage3"].shape[1] == 4 and factors["pixels_r"].shape == (1024, 4)
    fit = jaxnmf.load_fit(tmp_path / "fit.npz")  # the fit itself, for transform on new images
    np.testing.assert_allclose(np.asarray(fit.F), factors["F"], rtol=1e-6)
    assert fit.loss == pytest.approx(summary["fit"]["loss"]) and set(fit.factors) == set(summary["data"]["blocks"])
    assert (tmp_path / "model" / "model.json").exists()
    assert list(tmp_path.glob("*.png"))


def test_quickstart_reuses_a_trained_model(smoke_run, tmp_path, capsys):
    quickstart.main(["--smoke", "--out", str(tmp_path), "--model-path", str(smoke_run / "model")])
    printed = capsys.readouterr().out
    assert "loaded" in printed and "training" not in printed and f"report: {tmp_path / 'report.html'}" in printed
    a = json.loads((smoke_run / "summary.json").read_text())
    b = json.loads((tmp_path / "summary.json").read_text())
    assert a["fit"]["loss"] == pytest.approx(b["fit"]["loss"], rel=1e-5)


def test_quickstart_with_hals_on_bfloat16_blocks(smoke_run, tmp_path):
    quickstart.main(["--smoke", "--out", str(tmp_path), "--model-path", str(smoke_run / "model"),
                     "--solver", "hals", "--block-dtype", "bfloat16"])
    mu = json.loads((smoke_run / "summary.json").read_text())
    hals = json.loads((tmp_path / "summary.json").read_text())
    assert (hals["config"]["solver"], hals["config"]["block_dtype"]) == ("hals", "bfloat16")
    # the same data (rounded to 3 digits) and objective: HALS fits it at least as well as MU
    assert hals["fit"]["loss"] <= 1.02 * mu["fit"]["loss"]


@pytest.mark.parametrize("args,message", [
    (["--rank", "0"], "--rank: must be >= 1"),
    (["--dataset", "mnist"], "--dataset: unknown dataset"),
    (["--layers", "stage9"], "--layers: unknown layer 'stage9'"),
    (["--variant", "mine"], "--variant: unknown variant"),
    (["--solver", "als"], "--solver: choose 'mu' or 'hals'"),
    (["--block-dtype", "float16"], "--block-dtype: choose 'float32' or 'bfloat16'"),
    (["--n-probe", "5000"], "--n-probe: 5000 probe images"),
    (["--model-path", "/nonexistent"], "--model-path: no trained model"),
])
def test_bad_options_are_refused_before_any_work(args, message, capsys):
    with pytest.raises(SystemExit):
        quickstart.main(args)
    assert message in capsys.readouterr().err


def test_variants_map_to_solver_options():
    assert RunConfig(variant="authors").solver_options() == dict(
        block_weights="none", l2_F=1.0, l1_F=1.0, l2=0.0, l1=0.0, unit_columns=True, penalty_units="raw")
    assert RunConfig(variant="paper", l2_F=0.5).solver_options()["l2_F"] == 0.5
    assert RunConfig().solver_options()["block_weights"] == "frobenius"
    check_config(RunConfig(layers=("stage1:avg", "softmax")))


def test_pipeline_tcav_restarts_and_predicted_groups(smoke_run, tmp_path):
    """The pipeline's TCAV step end to end at the smallest size, on a fit with 2 restarts and
    predicted-class groups (so transform gets the held-out images' predicted classes): held-out
    images, concept sets through transform, negative controls and their verdict in the report and
    summary.json."""
    from experiments.pipeline import run

    cfg = RunConfig(dataset="shapes", width=4, n_train=256, n_test=200, n_probe=96, epochs=1, batch_size=64, rank=4,
                    iterations=20, restarts=2, example_groups="predicted", group_F=0.01, tcav=True,
                    tcav_images=100, model_path=str(smoke_run / "model"), out=str(tmp_path))
    html = run(cfg).read_text()
    summary = json.loads((tmp_path / "summary.json").read_text())
    sections = summary["extra_sections"]
    data = next(iter(sections.values())) if isinstance(sections, dict) else sections[0]
    data = data.get("data", data)
    assert data["layers"] == ["stage3", "stage4", "pool"] and data["target"] == "logprob"
    negative = data["controls"]["negative"]
    assert negative["sets"] == 300 and negative["tests"] > 0 and "calibrated" in negative["verdict"]
    assert "negative-control tests" in html
    assert "100 images of the shapes test split not used in the fit" in html
    assert summary["config"]["restarts"] == 2 and len(summary["fit"]["restart_losses"]) == 2
    assert summary["config"]["example_groups"] == "predicted"
    assert_offline(html)


def test_tcav_controls_prints_one_line_per_seed_and_statistic(smoke_run, capsys):
    from experiments import tcav_controls
    tcav_controls.main(["--model-path", str(smoke_run / "model"), "--images", "240", "--n-concept", "12",
                        "--negative-controls", "40", "--seeds", "1", "--statistics", "cosine", "sign"])
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("seed")]
    assert len(lines) == 2 and "cosine" in lines[0] and "sign" in lines[1]
    assert all("negative" in line and "positive" in line for line in lines)
    with pytest.raises(SystemExit):
        tcav_controls.main(["--model-path", str(smoke_run / "model"), "--images", "20", "--n-concept", "50",
                            "--seeds", "1"])


def test_the_default_block_emphasis_is_dropped_with_other_layers_or_weights(monkeypatch, capsys):
    ran = []
    monkeypatch.setattr(quickstart, "run_cli", lambda parser, cfg: ran.append(cfg))
    quickstart.main([])
    assert ran[-1].block_emphasis == quickstart.EMPHASIS and ran[-1].rank == 24
    for argv in (["--layers", "stage3", "pool"], ["--variant", "paper"], ["--block-weights", "none"]):
        quickstart.main(argv)
        assert ran[-1].block_emphasis is None and "dropped for these options" in capsys.readouterr().out
    quickstart.main(["--layers", "stage3", "pool", "--block-emphasis", "pool=3"])
    assert ran[-1].block_emphasis == ("pool=3",)
    quickstart.main(["--block-emphasis", "none"])
    assert ran[-1].block_emphasis is None
