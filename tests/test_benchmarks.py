"""Smoke tests of the benchmark suite at a tiny size (no timing assertions)."""
import json

import numpy as np
import pytest

from benchmarks import measure, run


def test_quick_mode_tiny_steps(tmp_path, monkeypatch):
    monkeypatch.setattr(measure, "_on_gpu", lambda: True)  # the bandwidth column, as on a GPU
    results = run.main(["--quick", "--cases", "tiny", "--skip", "memory", "restarts", "traces", "--out", str(tmp_path)])
    case = results["cases"]["tiny"]
    assert set(case["coupled"][10]) >= {"jaxnmf MU", "NumPy reference MU", "GEMM floor (JAX)", "GEMM floor (NumPy)"}
    assert "gb_per_s" in case["coupled"][10]["jaxnmf MU"]
    assert "scikit-learn MU" in case["single"]["per_rank"][10]
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved["machine"]["openblas_env"].keys() == {"OPENBLAS_CORETYPE", "OPENBLAS_L2_SIZE"}
    assert any(t["name"].startswith("jaxnmf MU step / NumPy reference") for t in saved["targets"]["tiny"])
    table = (tmp_path / "results.md").read_text()
    assert "jaxnmf MU / NumPy reference" in table and "GB/s" in table and "| target |" in table


@pytest.mark.heavy
def test_quick_mode_tiny_all_sections(tmp_path):
    results = run.main(["--quick", "--cases", "tiny", "--out", str(tmp_path)])
    case = results["cases"]["tiny"]
    assert all("ratio" in m for m in case["memory"]), case["memory"]
    assert {"jaxnmf MU", "NumPy reference MU"} <= set(case["traces"]["coupled"])
    assert "scikit-learn MU" in case["traces"]["single"]
    assert case["restarts"]["fit_ratio"] > 0
    assert (tmp_path / "objective_vs_time.png").stat().st_size > 0
    statuses = {t["status"] for t in json.loads((tmp_path / "results.json").read_text())["targets"]["tiny"]}
    assert statuses <= {"PASS", "MISS", "open"}


@pytest.mark.heavy
def test_sharded_benchmark_reports_both_layouts(capsys):
    from benchmarks import sharded
    rows = sharded.main(["--case", "small", "--rank", "5", "--iterations", "5", "--repeats", "1", "--devices", "1", "2"])
    assert [r["devices"] for r in rows] == [1, 2]
    assert rows[1]["sharded"]["F_sharding"] == "P(None, 'examples')"  # F stays sharded over the examples
    assert "| 2 |" in capsys.readouterr().out


def _tiny_stacked():
    """The tiny case's blocks stacked by rows (float64), their row views and the shared start (float64)."""
    from benchmarks import cases, peer
    case = cases.CASES["tiny"]
    stacked = peer.stacked_data(case).astype(np.float64)
    blocks = peer.split_rows(stacked, case.rows)
    F0, W0 = cases.init_factors(dict(enumerate(blocks)), 5)
    return case, stacked, blocks, F0.astype(np.float64), [w.astype(np.float64) for w in W0]


def test_peer_sklearn_objective_is_the_coupled_one():
    """scikit-learn's own objective on X^T ~ (F^T)(W_stack^T) is jaxnmf's coupled J of the same factors."""
    import jaxnmf
    from benchmarks import peer
    case, stacked, blocks, F0, W0 = _tiny_stacked()
    start = [F0.copy()] + [w.copy() for w in W0]
    F, W, n_iter, own = peer.sklearn_cd(stacked, F0, W0, tol=0, max_iter=5)()
    Ws = peer.split_rows(W, case.rows)
    assert n_iter == 5 and F.shape == F0.shape and not np.allclose(F, F0)
    coupled = float(jaxnmf.objective(blocks, F, Ws))
    assert coupled < float(jaxnmf.objective(blocks, F0, W0))
    assert abs(own - coupled) <= 1e-6 * coupled
    assert abs(peer.objective64(blocks, F, Ws) - coupled) <= 1e-6 * coupled
    assert all(np.array_equal(a, b) for a, b in zip(start, [F0, *W0]))  # the start is not updated in place


def test_peer_first_reaching_locates_the_first_iteration():
    from benchmarks import peer
    trace = [10.0, 8.0, 5.0, 5.0, 3.0]
    assert peer.first_reaching(trace, 5.0) == 3  # J after iteration 3 is the first <= 5
    assert peer.first_reaching(trace, 10.0) == 1
    assert peer.first_reaching(trace, 4.0) == 5
    assert peer.first_reaching(trace, 2.9) is None


def test_peer_quick_tiny(tmp_path):
    from benchmarks import peer
    results = peer.main(["--cases", "tiny", "--quick", "--solvers", "hals", "--max-iter", "100", "--out", str(tmp_path)])
    case = results["cases"]["tiny"]
    sk, hals = case["sklearn"], case["jaxnmf"]["hals"]
    assert sk["own_rel_diff"] < 1e-4 and 1 <= sk["n_iter"] <= 300
    assert 1 <= hals["iterations"] <= 100
    assert hals["reached"] == (hals["objective"] <= case["target"])
    assert hals["ratio"] == pytest.approx(hals["seconds"] / sk["seconds"])
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved["cases"]["tiny"]["jaxnmf"]["hals"]["iterations"] == hals["iterations"]
    table = (tmp_path / "results.md").read_text()
    assert "| jaxnmf HALS to J_sk |" in table and ("PASS" in table or "MISS" in table)
    assert not list(tmp_path.glob(".*"))  # no temporary file left behind


def test_scaling_normalised_ratios_and_reasons():
    from benchmarks import scaling
    assert scaling.normalised([1.0, 2.0, 5.0], [1000, 2000, 4000]) == pytest.approx([1.0, 1.0, 1.25])
    crossing = scaling.reasons(1000, 4000, {"the data": 1000}, {"L3": 2_000_000}, load=0.0)
    assert len(crossing) == 1 and "L3" in crossing[0] and "N = 1000" in crossing[0]
    assert "no cache level" in scaling.reasons(1000, 4000, {"the data": 1000}, {"L3": 500}, load=0.0)[0]
    points = [dict(n=n, data_bytes=1000 * n, f_bytes=80 * n, load=0.0, seconds={"MU": t, "HALS": 1e-3 * n})
              for n, t in [(1000, 1.0), (2000, 2.0), (4000, 5.1)]]
    analysis = scaling.analyse(points, {"L3": 2_000_000})
    assert [f["n"] for f in analysis["MU"]["flags"]] == [4000] and analysis["HALS"]["flags"] == []
    assert analysis["MU"]["per_1000_columns"] == pytest.approx([1.0, 1.0, 1.275])


def test_scaling_tiny(tmp_path):
    from benchmarks import scaling
    results = scaling.main(["--case", "tiny", "--n", "300", "600", "--repeats", "2", "--out", str(tmp_path)])
    assert [p["n"] for p in results["points"]] == [300, 600]
    for step in scaling.STEPS:
        entry = results["analysis"][step]
        assert entry["normalised"][0] == 1.0 and all(t > 0 for t in entry["seconds"])
    table = (tmp_path / "results.md").read_text()
    assert "| 600 |" in table and "largest normalised ratio" in table
    assert json.loads((tmp_path / "results.json").read_text())["points"][1]["data_bytes"] == 4 * 248 * 600


def test_out_of_core_tiny(tmp_path, monkeypatch):
    from benchmarks import out_of_core
    # the peak-memory child in this process (a fresh interpreter would take longer than the rest)
    monkeypatch.setattr(out_of_core, "measure_memory", lambda folder, rank, iters: out_of_core._memory_child(
        str(folder), rank, iters))
    results = out_of_core.main(["--size-gb", "0.002", "--n", "200", "--rank", "3", "--iters", "2", "--repeats", "1",
                                "--dir", str(tmp_path), "--out", str(tmp_path / "out")])
    assert results["sequential"]["drop_possible"] in (True, False) and results["data_bytes"] > 0
    assert len(results["streamed"]["cold"]["pass_seconds"]) == 3  # the initial pass and one per iteration
    assert results["streamed"]["cold"]["n_iter"] == 2
    assert results["streamed"]["cold"]["loss"] == pytest.approx(results["in_memory"]["loss"], rel=1e-5)
    assert results["memory"]["peak_bytes"] > 0
    assert not list(tmp_path.glob("jaxnmf-out-of-core-*"))  # the data is removed
    table = (tmp_path / "out" / "results.md").read_text()
    assert "sequential read, cold" in table and ("PASS" in table or "MISS" in table)
    assert json.loads((tmp_path / "out" / "results.json").read_text())["rank"] == 3
