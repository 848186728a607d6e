"""Smoke tests of the benchmark suite at a tiny size (no timing assertions)."""
import json

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
