"""The study scripts at their smallest settings: the paper's (mock CIFAR) and the cross-dataset one."""
import json

import numpy as np
import pytest

from experiments import paper
from offline_html import assert_offline


@pytest.mark.heavy  # 50 s, mostly compiling VGG-11; the VGG layers are tested in test_models.py
def test_paper_script_smoke_on_mock_cifar_with_vgg(tmp_path, mock_cifar_data):
    with mock_cifar_data(120):
        paper.main(["--smoke", "--models", "vgg11", "--out", str(tmp_path), "--data-dir", str(tmp_path / "tfds")])
    summary = json.loads((tmp_path / "vgg11" / "summary.json").read_text())
    assert summary["config"]["dataset"] == "cifar100"
    assert len(summary["data"]["class_names"]) == 100 and len(summary["data"]["superclass_names"]) == 20
    assert all("top_superclass" in row for row in summary["factor_table"])
    assert list(summary["neurons"]["layers"]) == ["pool1", "pool2", "pool3", "pool4", "pool5"]


@pytest.mark.heavy
def test_paper_script_smoke_on_mock_cifar_both_models(tmp_path, mock_cifar_data):
    with mock_cifar_data(120):
        paper.main(["--smoke", "--out", str(tmp_path), "--data-dir", str(tmp_path / "tfds")])
    for model in ("resnet18", "vgg11"):
        summary = json.loads((tmp_path / model / "summary.json").read_text())
        assert summary["config"]["dataset"] == "cifar100"
        assert len(summary["data"]["class_names"]) == 100 and len(summary["data"]["superclass_names"]) == 20
        assert all("top_superclass" in row for row in summary["factor_table"])
    assert list(json.loads((tmp_path / "vgg11" / "summary.json").read_text())["neurons"]["layers"]) == [
        "pool1", "pool2", "pool3", "pool4", "pool5"]
    assert (tmp_path / "figure3_eigenvalues.png").exists()


def test_cross_dataset_smoke_with_sparsity_path_and_seen_unseen_controls(tmp_path, capsys):
    from experiments import cross_dataset
    cross_dataset.main(["--smoke", "--out", str(tmp_path)])
    printed = capsys.readouterr().out
    assert "factors active" in printed
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["data"]["pixel_blocks"] == []
    assert summary["config"]["group_F"] > 0 and summary["config"]["train_restrict"]
    F = np.load(tmp_path / "factors.npz")["F"]
    assert F.shape == (6, 96)
    assert 0 < summary["fit"]["n_active"] < 6  # the default group_F neither keeps nor kills every factor
    path = summary["extra_sections"]["Sparsity path"]["points"]
    values = [p["group_F"] for p in path]
    assert values == sorted(values) and values[0] == 0 and summary["config"]["group_F"] in values
    active = [p["active"] for p in path]
    assert all(b <= a for a, b in zip(active, active[1:])) and active[0] > active[-1]  # warm starts never revive
    assert set(path[0]["relative_errors"]) == {"stage3", "stage4", "pool"}
    study = summary["extra_sections"]["Seen and unseen attribute values"]
    assert study["seen"] == {"shape": ["circle", "square", "triangle"], "colour": ["blue", "green", "red"]}
    group_F = summary["config"]["group_F"]
    for key in ("this_network", "trained_on_everything", "random_network", "pixels_only"):
        fits = study["conditions"][key]
        assert set(fits) == {f"group_F={group_F:g}", "group_F=0"}
        for fit in fits.values():
            assert set(fit["auc"]) == {"shape", "colour"}
            assert all(0 <= fit["auc"][a][k] <= 1 for a in fit["auc"] for k in ("seen", "unseen"))
    assert study["conditions"]["this_network"][f"group_F={group_F:g}"]["active"] == summary["fit"]["n_active"]
    assert (tmp_path / "control_trained_on_everything" / "model" / "model.json").exists()
    assert_offline((tmp_path / "report.html").read_text())


@pytest.mark.heavy  # 35-55 s; the shapes smoke run above checks the same code path
def test_the_default_group_penalty_keeps_some_factors_on_digits(tmp_path):
    from experiments import cross_dataset
    cross_dataset.main(["--smoke", "--out", str(tmp_path), "--dataset", "digits", "--probe-dataset", "digits",
                        "--train-restrict", "", "--no-studies"])
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["config"]["group_F"] == cross_dataset.DEFAULTS.group_F
    assert 0 < summary["fit"]["n_active"] < 6


def test_cross_dataset_refuses_a_collapsed_fit_before_any_report(tmp_path, capsys):
    from experiments import cross_dataset
    with pytest.warns(RuntimeWarning, match="every factor is zero"), pytest.raises(SystemExit):
        cross_dataset.main(["--smoke", "--out", str(tmp_path), "--group-F", "1000"])
    err = capsys.readouterr().err
    assert "--group-F 1000 (relative units, with --l2 0.01) switched off all 6 factors" in err
    assert "e.g. --group-F 100" in err
    assert not (tmp_path / "report.html").exists() and not (tmp_path / "summary.json").exists()




def test_training_study_smoke_records_and_resumes(tmp_path, capsys):
    from experiments import training_study
    args = ["--datasets", "shapes", "--seeds", "0", "--presets", "plateau", "--n-train", "128", "--n-test", "64",
            "--max-epochs", "2", "--width", "4", "--out", str(tmp_path)]
    training_study.main(args)
    (record,) = json.loads((tmp_path / "training.json").read_text())
    assert (record["preset"], record["learning_rate"], record["config"]["schedule"]) == ("plateau", 0.02, "plateau")
    assert len(record["history"]) == record["epochs"] <= 2 and "validation_accuracy" in record["history"][0]
    table = (tmp_path / "training.md").read_text()
    assert f"| shapes | plateau | 4 | 0.02 | {record['test_accuracy']:.3f} |" in table
    capsys.readouterr()
    training_study.main(args)  # every run is recorded: nothing trains again
    assert "test accuracy" not in capsys.readouterr().out
