"""A run killed with SIGKILL (no handler runs, no file is closed) at several points leaves a folder
that says it is unfinished and never mixes two runs; started again with the same command it
completes, with the numbers of a run that was never interrupted.

Each run is a subprocess of ``python -m experiments.quickstart``; a wrapper replaces one function
by one that SIGKILLs its own process on its n-th call, so the kill lands at a known point without
any hook in the code under test.
"""
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from experiments._atomic import TEMPORARY_GLOB

ROOT = Path(__file__).resolve().parents[1]
# tiny, but two epochs, so that training can be killed between them
OPTIONS = ["--width", "4", "--n-train", "256", "--n-test", "128", "--n-probe", "96", "--epochs", "2",
           "--batch-size", "64", "--rank", "4", "--iterations", "20", "--no-tcav"]

KILL_AT = """
import importlib, os, signal, sys
module, name, nth = sys.argv[1], sys.argv[2], int(sys.argv[3])
owner = importlib.import_module(module)
original, calls = getattr(owner, name), []
def killed_on_the_nth_call(*args, **kwargs):
    calls.append(1)
    if len(calls) == nth:
        os.kill(os.getpid(), signal.SIGKILL)
    return original(*args, **kwargs)
setattr(owner, name, killed_on_the_nth_call)
from experiments import quickstart
quickstart.main(sys.argv[4:])
"""


def quickstart(out, kill_at=None):
    """Run the quickstart into ``out``; ``kill_at`` = (module, function, n): SIGKILL on the n-th call.
    The runs share the suite's compilation cache (tests/conftest.py sets it in the environment)."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "JAX_PLATFORMS": "cpu"}
    args = ["--out", str(out), *OPTIONS]
    command = ([sys.executable, "-c", KILL_AT, *map(str, kill_at), *args] if kill_at
               else [sys.executable, "-m", "experiments.quickstart", *args])
    done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    expected = -signal.SIGKILL if kill_at else 0
    assert done.returncode == expected, done.stdout[-3000:] + done.stderr[-3000:]
    return done


def marker(out):
    return json.loads((out / "run.json").read_text())


def numbers(out):
    """What a run found: everything in summary.json that does not depend on where it ran."""
    summary = json.loads((out / "summary.json").read_text())
    summary["config"].pop("out")
    summary.pop("figures")
    return summary


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    out = tmp_path_factory.mktemp("uninterrupted")
    quickstart(out)
    return numbers(out)


@pytest.mark.heavy  # about 4 minutes of one worker (six quickstart processes); the fit-level SIGKILL resume
#                     (test_fit_checkpoints.py) and the rerun of an interrupted run (test_run_folders.py) stay in the default run
def test_sigkill_in_training_fit_and_report_then_rerun_completes_with_the_same_numbers(tmp_path, uninterrupted):
    out = tmp_path / "run"
    kills = [
        ("models.train", "_accuracy", 2, "training, epoch 2 (epoch 1 is checkpointed)"),
        ("jaxnmf", "fit", 1, "the factorisation (the network is saved)"),
        ("experiments.report", "savez_atomic", 1, "the report (summary.json is written, factors.npz not)"),
    ]
    for module, function, nth, where in kills:
        quickstart(out, kill_at=(module, function, nth))
        assert marker(out)["complete"] is False, where
        assert not (out / "report.html").exists(), where  # never a finished-looking report
    assert (out / "summary.json").exists() and not (out / "factors.npz").exists()  # killed between the two

    rerun = quickstart(out)
    assert "continuing the unfinished run" in rerun.stdout
    assert marker(out)["complete"] is True
    assert numbers(out) == uninterrupted
    assert not list(out.glob(TEMPORARY_GLOB))  # a killed write's temporary file is removed
