"""experiments.evaluate: the coupled NMF against the baselines on one network (issue 12), and its helpers."""
import json
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxnmf
from experiments import baselines, evaluate
from offline_html import assert_offline

METHODS = {"coupled", "activations_only", "pixels_only", "coupled_signed_pixels", "kmeans", "pca", "topk_sae",
           *(f"nmf[{layer}]" for layer in ("stage1:avg", "stage2:avg", "stage3", "stage4", "pool"))}


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    out = tmp_path_factory.mktemp("evaluate")
    evaluate.main(["--smoke", "--out", str(out)])
    return out


def test_smoke_evaluates_every_method(smoke):
    summary = json.loads((smoke / "summary.json").read_text())
    assert {m["id"] for m in summary["methods"]} == METHODS
    attributes = summary["attributes"]
    assert set(attributes) == {"shape", "colour", "position", "size", "background"}
    for m in summary["methods"]:
        for a in attributes:
            assert 0.0 <= m["per_attribute"][a] <= 1.0, (m["id"], a)
            assert all(0.0 <= v["auc"] <= 1.0 for v in m["per_value"][a].values())
        assert m["mean"] == pytest.approx(np.mean([m["per_attribute"][a] for a in attributes]))
        assert m["worst"] == pytest.approx(min(m["per_attribute"][a] for a in attributes))
        assert 0.0 <= m["relative_error"] <= 1.0 and m["seconds"] >= 0.0
    pca = next(m for m in summary["methods"] if m["id"] == "pca")
    assert pca["mean"] >= 0.5  # sign-free: never below chance
    st = summary["stability"]
    assert st["restarts"] == 2 and len(st["per_factor"]) == summary["rank"]
    assert all(0.0 <= c <= 1.0 + 1e-9 for c in st["per_factor"])
    assert json.loads((smoke / "run.json").read_text())["complete"]


def test_smoke_writes_the_table_and_an_offline_report(smoke):
    summary = json.loads((smoke / "summary.json").read_text())
    table = (smoke / "evaluation.md").read_text()
    rows = [line for line in table.splitlines() if line.startswith("| ") and not line.startswith("| method")]
    assert len(rows) == len(summary["methods"])
    assert all(row.count("|") == len(summary["attributes"]) + 6 for row in rows)
    header = next(line for line in table.splitlines() if line.startswith("| method"))
    assert header.split("|")[2:-5] == [f" {a} " for a in summary["attributes"]]
    page = (smoke / "report.html").read_text()
    assert_offline(page)
    assert not re.search(r"""=\s*["']?\s*(https?:|//)""", page)
    for m in summary["methods"]:
        assert m["label"] in page or m["label"].replace("&", "&amp;") in page
    assert "Stability" in page


def test_a_rerun_with_other_options_is_refused(smoke, capsys):
    with pytest.raises(SystemExit):
        evaluate.main(["--smoke", "--out", str(smoke), "--seed", "5"])
    assert "--out" in capsys.readouterr().err


@pytest.mark.parametrize("argv, flag", [
    (["--rank", "0"], "--rank"),
    (["--dataset", "digits"], "--dataset"),
    (["--dataset", "nope"], "--dataset"),
    (["--restarts-for-stability", "1"], "--restarts-for-stability"),
    (["--sae-k", "100"], "--sae-k"),
    (["--model-path", "/nonexistent/model"], "--model-path"),
    (["--n-probe", "0"], "--n-probe"),
])
def test_bad_options_are_refused_before_any_work(argv, flag, tmp_path, capsys):
    with pytest.raises(SystemExit):
        evaluate.main([*argv, "--out", str(tmp_path / "out")])
    assert flag in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_every_option_has_help_with_its_default():
    parser = evaluate.build_parser()
    for action in parser._actions:
        if action.option_strings and action.dest not in ("help", "smoke"):
            assert action.help and "(default: " in action.help, action.option_strings
    parser.format_help()


# ----------------------------------------------------------------------------- helpers
def test_topk_keeps_exactly_k_non_zeros_per_example():
    pre = jax.random.uniform(jax.random.key(0), (50, 12), minval=0.1, maxval=1.0, dtype=jnp.float32)
    for k in (1, 3, 12):
        z = np.asarray(baselines.topk_codes(pre, k))
        assert np.all(np.sum(z > 0, axis=1) == k)
        kept = np.sort(np.asarray(pre), axis=1)[:, -k:]
        np.testing.assert_allclose(np.sort(z, axis=1)[:, -k:], kept)
    signed = jnp.asarray([[-1.0, -2.0, 0.5, -0.1]], dtype=jnp.float32)
    np.testing.assert_array_equal(np.asarray(baselines.topk_codes(signed, 2)), [[0.0, 0.0, 0.5, 0.0]])


def test_topk_sae_loss_decreases_on_a_toy_problem():
    rng = np.random.default_rng(0)
    atoms = rng.random((6, 40))
    codes = rng.random((300, 6)) * (rng.random((300, 6)) < 0.3)
    x = (codes @ atoms).astype(np.float32)
    params, losses = baselines.train_topk_sae(x, n_latents=6, k=2, steps=300, learning_rate=1e-2, seed=0)
    assert losses.shape == (300,) and np.all(np.isfinite(losses))
    assert losses[-1] < 0.5 * losses[0]
    np.testing.assert_allclose(np.linalg.norm(np.asarray(params["W_dec"]), axis=1), 1.0, rtol=1e-5)
    s = baselines.topk_sae(x.T, 6, 2, steps=300, learning_rate=1e-2)
    assert s.scores.shape == (6, 300) and np.all(s.scores >= 0)
    assert np.all(np.sum(s.scores > 0, axis=0) <= 2)
    assert 0.0 <= s.relative_error < 1.0


def test_pca_is_credited_regardless_of_sign():
    rng = np.random.default_rng(1)
    y = rng.integers(0, 2, 200)
    X = rng.normal(size=(10, 200))
    X[0] += 3.0 * y  # one direction carries the attribute
    for sign in (1.0, -1.0):
        s = baselines.pca(sign * X, 3)
        assert s.scores.shape == (6, 200) and np.all(s.scores >= 0)
        np.testing.assert_array_equal(s.factor_of, [0, 1, 2, 0, 1, 2])
        auc = jaxnmf.attribute_auc(s.scores, {"y": y})["y"]
        assert auc["mean"] > 0.9
    P, target = rng.normal(size=(2, 50)), {"y": rng.integers(0, 3, 50)}
    plain = jaxnmf.attribute_auc(baselines.nonnegative_scores(P), target)["y"]["values"]
    both = [jaxnmf.attribute_auc(baselines.sign_free(sign * P)[0], target)["y"]["values"] for sign in (1.0, -1.0)]
    # the sign of a component changes nothing (but which of the two rows wins)
    assert {v: a for v, (_, a) in both[0].items()} == pytest.approx({v: a for v, (_, a) in both[1].items()})
    for v, (_, auc) in both[0].items():
        assert auc >= 0.5 and auc >= plain[v][1] - 1e-12


def test_kmeans_and_single_layer_nmf_scores():
    rng = np.random.default_rng(2)
    centres = rng.random((3, 20)) * 5
    labels = rng.integers(0, 3, 150)
    X = (centres[labels] + 0.05 * rng.random((150, 20))).T  # (20, 150), columns are examples
    km = baselines.kmeans(X, 3)
    assert km.scores.shape == (3, 150) and np.all(km.scores >= 0)
    assert jaxnmf.attribute_auc(km.scores, {"c": labels})["c"]["mean"] > 0.99
    nmf = baselines.sklearn_nmf(X, 3, max_iter=200)
    assert nmf.scores.shape == (3, 150) and nmf.relative_error < 0.1 and nmf.info["init"] == "nndsvda"
    assert baselines.sklearn_nmf(X[:2], 3, max_iter=50).info["init"] == "random"  # rank above the rows


def test_weighted_relative_error_matches_the_blocks():
    from experiments._evaluation import weighted_relative_error

    rng = np.random.default_rng(3)
    blocks = {"a": rng.random((30, 40)).astype(np.float32), "b": 10 * rng.random((5, 40)).astype(np.float32)}
    res = jaxnmf.fit(blocks, 3, key=jax.random.key(0), max_iter=30, block_weights="frobenius")
    F, W = np.asarray(res.F, np.float64), {n: np.asarray(w, np.float64) for n, w in res.factors.items()}
    errs = [np.linalg.norm(blocks[n] - W[n] @ F) / np.linalg.norm(blocks[n]) for n in blocks]
    assert weighted_relative_error(res, blocks) == pytest.approx(np.sqrt(np.mean(np.square(errs))), rel=1e-3)


def test_rank_auto_is_parsed_with_its_grid():
    cfg, settings = evaluate.config_from_args(evaluate.build_parser().parse_args(["--rank", "auto", "--smoke"]))
    assert settings.rank_grid == evaluate.SMOKE_EXTRA["rank_grid"] and cfg.rank == max(settings.rank_grid)
    args = evaluate.build_parser().parse_args(["--rank", "auto", "--rank-grid", "20,8,12"])
    evaluate.check_args(args)
    cfg, settings = evaluate.config_from_args(args)
    assert settings.rank_grid == (8, 12, 20) and cfg.rank == 20 and settings.sae_k_given is None
    cfg, settings = evaluate.config_from_args(evaluate.build_parser().parse_args(["--rank", "7"]))
    assert settings.rank_grid is None and cfg.rank == 7


@pytest.mark.parametrize("argv, flag", [
    (["--rank", "many"], "--rank"),
    (["--rank", "auto", "--rank-grid", "0,4"], "--rank-grid"),
    (["--rank", "auto", "--rank-grid", "4,4"], "--rank-grid"),
    (["--rank", "auto", "--rank-grid", "4,x"], "--rank-grid"),
    (["--rank", "auto", "--rank-grid", "900", "--n-probe", "1000"], "--rank-grid"),
    (["--rank", "auto", "--rank-curve-restarts", "0"], "--rank-curve-restarts"),
])
def test_bad_rank_auto_options_are_refused(argv, flag, tmp_path, capsys):
    with pytest.raises(SystemExit):
        evaluate.main([*argv, "--out", str(tmp_path / "out")])
    assert flag in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_the_rank_curve_goes_into_the_table_and_the_offline_report(smoke, tmp_path):
    from experiments import _evaluation

    summary = json.loads((smoke / "summary.json").read_text())
    rc = dict(ranks=[2, 3, 4], bcv_error=[0.4, 0.3, 0.29], held_out_error=[0.41, 0.31, 0.3],
              train_error=[0.39, 0.29, 0.27], stability=[0.99, 0.9, None], converged=[True, True, False],
              n_train=77, n_held_out=19, gain_per_factor=[None, 0.25, 0.033], chosen=3, tol=0.02, restarts=2,
              rule="the rule", figure="rank_curve.png")
    _evaluation._rank_figure(rc, tmp_path / "rank_curve.png")
    summary.update(rank_choice=rc, out=str(tmp_path))
    summary["stability"]["best_for"] = {int(k): v for k, v in summary["stability"]["best_for"].items()}  # JSON keys
    table = _evaluation.markdown(summary)
    assert "| 3 (chosen) | 0.3000 | 25.0 % |" in table and "d = 3" in table
    page = _evaluation.page(summary)
    assert_offline(page)
    assert 'id="rank"' in page and "data:image/png;base64," in page and "3 (chosen)" in page


def test_block_emphasis_reaches_the_config_and_is_checked():
    args = evaluate.build_parser().parse_args(["--block-emphasis", "stage1:avg=8", "pixels=2"])
    evaluate.check_args(args)
    cfg, _ = evaluate.config_from_args(args)
    assert cfg.emphasis() == {"stage1:avg": 8.0, "pixels": 2.0}
    for bad, message in ((["stage9=2"], "--block-emphasis: no block named stage9"),
                         (["pool"], "--block-emphasis: 'pool' is not NAME=FACTOR")):
        with pytest.raises(ValueError, match=message):
            evaluate.check_args(evaluate.build_parser().parse_args(["--block-emphasis", *bad]))
