"""A run folder's marker, ``run.json``: the options of the run that writes the folder, and whether
it finished (``{"complete": true|false, "options": {...}}``).

`start` claims a folder before the run writes anything else to it. A folder that holds another
run (other options, an unreadable ``run.json``, or a report without ``run.json``, from before
this marker existed) is refused, unless ``overwrite``: then that run's result files go first
(and its networks, when the new run would train or load another network), so that the folder
never mixes two runs. `start` then writes ``run.json`` with ``"complete": false``; `finish`
sets ``"complete": true`` once the last result file is written. A run stopped in between leaves
``"complete": false``; started again with the same options it redoes the work (training
resumes from ``checkpoints/``) and completes the folder.
"""
from __future__ import annotations

import json
import shutil
from collections.abc import Mapping, Sequence
from pathlib import Path

from experiments._atomic import TEMPORARY_GLOB, write_text_atomic

__all__ = ["MARKER", "RESULT_FILES", "finish", "read_marker", "start"]

MARKER = "run.json"
RESULT_FILES = ("report.html", "summary.json", "factors.npz", "fit.npz", "timing.json",  # and every *.png
                "explain.json", "probe_images.npy")  # experiments.explain
NETWORK_FOLDERS = ("model", "checkpoints")
IGNORED_OPTIONS = ("out", "overwrite", "data_dir")  # where a run reads and writes, not what it computes


def start(out: Path, options: Mapping, *, network_options: Sequence[str], overwrite: bool = False) -> None:
    """Claim the folder ``out`` for a run with ``options`` (a ``RunConfig`` as a dict); see the
    module docstring.

    ``network_options`` name the options the run's network depends on: overwriting a run that
    differs in one of them also removes ``model/``, ``checkpoints/`` and any subfolder holding
    a study's own network (its own ``model/`` or ``checkpoints/``).

    Raises:
        ValueError: ``out`` holds another run and ``overwrite`` is false; the message names the
            folder and the options that differ. Nothing is written then.
    """
    options = _as_json(options)
    out.mkdir(parents=True, exist_ok=True)
    marker = read_marker(out)
    recorded = marker["options"] if marker else None
    differences = _differences(out, recorded, options)
    if differences and not overwrite:
        raise ValueError(f"--out: {out} holds another run ({'; '.join(differences)}); choose another --out, "
                         f"or add --overwrite to replace it")
    if differences:
        if recorded is not None:  # if stopped while removing, what is left reads as an unfinished old run
            _mark(out, recorded, complete=False)
        _remove_run(out, network=_network_differs(out, recorded, options, network_options))
    elif marker and not marker["complete"]:
        print(f"continuing the unfinished run in {out}")
    for temporary in out.glob(TEMPORARY_GLOB):  # left by a killed write
        temporary.unlink()
    _mark(out, options, complete=False)


def finish(out: Path, options: Mapping) -> None:
    """Mark the run in ``out`` complete; call it after its last result file is written."""
    _mark(out, _as_json(options), complete=True)


def read_marker(out: Path) -> dict | None:
    """``out/run.json`` as `start` and `finish` write it, or None when absent or unreadable."""
    try:
        marker = json.loads((out / MARKER).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    valid = (isinstance(marker, dict) and isinstance(marker.get("options"), dict)
             and isinstance(marker.get("complete"), bool))
    return marker if valid else None


def _as_json(options: Mapping) -> dict:
    """``options`` as they read back from JSON (tuples become lists), so that they compare."""
    return json.loads(json.dumps(dict(options)))


def _mark(out: Path, options: dict, *, complete: bool) -> None:
    write_text_atomic(out / MARKER, json.dumps({"complete": complete, "options": options}, indent=1))


def _differences(out: Path, recorded: dict | None, options: dict) -> list[str]:
    """Why the folder holds another run than one with ``options``: empty for the same run or none."""
    if recorded is None:
        if (out / MARKER).exists():
            return [f"its {MARKER} is unreadable"]
        if any((out / name).exists() for name in RESULT_FILES) or any(out.glob("*.png")):
            return [f"a report without {MARKER}, from an earlier version; its options are unknown"]
        return []
    shown = lambda values, key: json.dumps(values[key]) if key in values else "unset"
    keys = sorted((recorded.keys() | options.keys()) - set(IGNORED_OPTIONS))
    return [f"--{key.replace('_', '-')} {shown(recorded, key)} there, {shown(options, key)} here"
            for key in keys if key not in recorded or key not in options or recorded[key] != options[key]]


def _network_differs(out: Path, recorded: dict | None, options: dict, network_options: Sequence[str]) -> bool:
    """Whether the new run uses another network than the folder's (True when that is unknown)."""
    model_path = options.get("model_path")
    if model_path and Path(model_path).resolve().is_relative_to(out.resolve()):
        return False  # it loads a network of this folder: keep them
    return recorded is None or any(recorded.get(key) != options.get(key) for key in network_options)


def _remove_run(out: Path, *, network: bool) -> None:
    """Remove the result files of the run in ``out`` and, when ``network``, its networks."""
    for path in [*(out / name for name in RESULT_FILES), *out.glob("*.png")]:
        path.unlink(missing_ok=True)
    if network:
        for folder in sorted(path for path in out.iterdir() if path.is_dir()):
            if folder.name in NETWORK_FOLDERS or any((folder / name).is_dir() for name in NETWORK_FOLDERS):
                shutil.rmtree(folder)
