"""Run folders: files written atomically, ``run.json`` (the options, and whether the run finished),
reruns refused, continued or overwritten (``experiments._atomic``, ``experiments.run_folder``)."""
import dataclasses
import hashlib
import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from experiments import pipeline, run_folder
from experiments._atomic import atomic_file, savez_atomic, write_text_atomic
from experiments.pipeline import NETWORK_OPTIONS, RunConfig, run

CFG = RunConfig(dataset="shapes", width=4, n_train=256, n_test=200, n_probe=96, epochs=1, batch_size=64, rank=4,
                iterations=20, tcav=False)


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """One uninterrupted run that trains its network (the only training in this file)."""
    cfg = dataclasses.replace(CFG, out=str(tmp_path_factory.mktemp("base")))
    run(cfg)
    return cfg


def snapshot(folder):
    """Every file under ``folder``: relative path -> (modification time, content hash)."""
    return {str(path.relative_to(folder)): (path.stat().st_mtime_ns, hashlib.sha256(path.read_bytes()).hexdigest())
            for path in sorted(folder.rglob("*")) if path.is_file()}


def marker(folder):
    return json.loads((folder / "run.json").read_text())


def summary(folder):
    return json.loads((folder / "summary.json").read_text())


# ----------------------------------------------------------------------------- atomic writes
def test_a_failed_write_leaves_the_old_file_and_no_temporary_file(tmp_path):
    path = tmp_path / "summary.json"
    write_text_atomic(path, "old")
    with pytest.raises(RuntimeError), atomic_file(path) as f:
        f.write(b"half of the new")
        raise RuntimeError("disk full")
    assert path.read_text() == "old"

    class Interrupting:  # an array whose data never come: the writer stops midway
        def __array__(self, *args, **kwargs):
            raise KeyboardInterrupt

    arrays = tmp_path / "factors.npz"
    savez_atomic(arrays, F=np.ones(3))
    with pytest.raises(KeyboardInterrupt):
        savez_atomic(arrays, F=np.zeros(3), W=Interrupting())
    np.testing.assert_array_equal(np.load(arrays)["F"], np.ones(3))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["factors.npz", "summary.json"]
    write_text_atomic(path, "new")
    assert path.read_text() == "new"


# ----------------------------------------------------------------------------- the pipeline
def test_a_finished_run_is_marked_complete_with_its_options(base):
    recorded = marker(Path(base.out))
    assert recorded["complete"] is True
    assert recorded["options"] == json.loads(json.dumps(dataclasses.asdict(base)))


def test_a_rerun_with_other_options_is_refused_and_changes_nothing(base):
    out = Path(base.out)
    before = snapshot(out)
    with pytest.raises(ValueError, match="--rank 4 there, 3 here; --solver \"mu\" there, \"hals\" here") as error:
        run(dataclasses.replace(base, rank=3, solver="hals"))
    assert str(out) in str(error.value) and "--overwrite" in str(error.value)
    assert snapshot(out) == before


def test_a_report_without_run_json_is_another_run(base, tmp_path):
    out = tmp_path / "old"
    shutil.copytree(base.out, out)
    (out / "run.json").unlink()
    with pytest.raises(ValueError, match="a report without run.json"):
        run(dataclasses.replace(base, out=str(out)))
    assert not (out / "run.json").exists()


def test_overwrite_replaces_the_run_and_leaves_no_old_file(base, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(base.out, out)
    (out / "extra_stale.png").write_bytes(b"a figure of the old run")
    # other options that need no new compilation: another tolerance, a loaded network
    cfg = dataclasses.replace(base, out=str(out), tol=1e-4, model_path=str(Path(base.out) / "model"),
                              overwrite=True)
    run(cfg)
    new = summary(out)
    assert new["config"]["tol"] == 1e-4 and "overwrite" not in new["config"]
    assert marker(out) == {"complete": True, "options": json.loads(json.dumps(dataclasses.asdict(cfg)))}
    # another network (a loaded one): the old model/ and checkpoints/ went with the old results
    assert sorted(p.name for p in out.iterdir() if p.is_dir()) == []
    files = {p.name for p in out.iterdir()}
    assert files == {"report.html", "summary.json", "factors.npz", "fit.npz", "timing.json", "run.json",
                     *new["figures"]}


def test_an_interrupted_run_is_completed_by_a_rerun(base, tmp_path, monkeypatch):
    out = tmp_path / "run"
    out.mkdir()
    shutil.copytree(Path(base.out) / "checkpoints", out / "checkpoints")  # training had finished
    cfg = dataclasses.replace(base, out=str(out))

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(pipeline, "write_report", interrupted)
    with pytest.raises(KeyboardInterrupt):
        run(cfg)
    assert marker(out) == {"complete": False, "options": json.loads(json.dumps(dataclasses.asdict(cfg)))}
    assert not (out / "report.html").exists() and not (out / "summary.json").exists()

    monkeypatch.undo()
    run(cfg)  # the same options: continues (training resumes from the checkpoints) and completes
    assert marker(out)["complete"] is True and (out / "report.html").exists()
    resumed, uninterrupted = summary(out), summary(Path(base.out))
    assert resumed["fit"]["loss"] == pytest.approx(uninterrupted["fit"]["loss"], rel=1e-6)
    assert resumed["factor_table"] == uninterrupted["factor_table"]


# ----------------------------------------------------------------------------- overwriting, unit
def old_run(out, cfg, marked=True):
    """A finished run's folder, made by hand: results, a network, checkpoints, a study's network."""
    for name in ("report.html", "summary.json", "factors.npz", "timing.json", "objective.png"):
        (out / name).parent.mkdir(parents=True, exist_ok=True)
        (out / name).write_text("old")
    for name in ("model/model.json", "checkpoints/1/state", "control/model/model.json", "blocks/stage3.npy"):
        (out / name).parent.mkdir(parents=True, exist_ok=True)
        (out / name).write_text("old")
    if marked:
        run_folder.finish(out, dataclasses.asdict(cfg))


@pytest.mark.parametrize("change, network_removed", [
    (dict(rank=3, iterations=5), False),  # the fit changes, not the network: model/ and checkpoints/ kept
    (dict(width=8), True),
    (dict(seed=1, model_path="{out}/model"), False),  # it loads the folder's own network
    (dict(model_path="/elsewhere/model"), True),
])
def test_overwrite_removes_the_network_only_when_it_changes(tmp_path, change, network_removed):
    old = dataclasses.replace(CFG, out=str(tmp_path))
    old_run(tmp_path, old)
    change = {k: v.format(out=tmp_path) if isinstance(v, str) else v for k, v in change.items()}
    new = dataclasses.replace(old, **change, overwrite=True)
    run_folder.start(tmp_path, dataclasses.asdict(new), network_options=NETWORK_OPTIONS, overwrite=True)
    left = {str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*") if p.is_file()}
    network = {"model/model.json", "checkpoints/1/state", "control/model/model.json"}
    assert left == {"run.json", "blocks/stage3.npy"} | (set() if network_removed else network)
    assert marker(tmp_path) == {"complete": False, "options": json.loads(json.dumps(dataclasses.asdict(new)))}


def test_overwriting_a_report_without_run_json_removes_its_network(tmp_path):
    old_run(tmp_path, CFG, marked=False)
    run_folder.start(tmp_path, dataclasses.asdict(CFG), network_options=NETWORK_OPTIONS, overwrite=True)
    assert {str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*") if p.is_file()} == {
        "run.json", "blocks/stage3.npy"}


def test_an_unreadable_run_json_is_refused(tmp_path):
    (tmp_path / "run.json").write_text('{"complete": tr')
    with pytest.raises(ValueError, match="run.json is unreadable"):
        run_folder.start(tmp_path, dataclasses.asdict(CFG), network_options=NETWORK_OPTIONS)


def test_overwrite_is_a_command_line_option():
    parser = pipeline.parser_for("prog", "", CFG)
    assert pipeline.config_from_args(parser.parse_args(["--overwrite"])).overwrite is True
    assert pipeline.config_from_args(parser.parse_args([])).overwrite is False
