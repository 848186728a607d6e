"""Console commands (``[project.scripts]`` in pyproject.toml), beside ``python -m experiments.X``:
``jaxnmf-quickstart``, ``jaxnmf-paper``, ``jaxnmf-cross-dataset``, ``jaxnmf-evaluate``,
``jaxnmf-explain``, ``jaxnmf-tcav-controls``. Each imports its script only when run (``--help``
stays fast) and exits 0 on success; the scripts print where their report is."""
from __future__ import annotations

import importlib
from typing import Callable

SCRIPTS = ("quickstart", "paper", "cross_dataset", "evaluate", "explain", "tcav_controls")


def _command(script: str) -> Callable[[], None]:
    def command() -> None:
        importlib.import_module(f"experiments.{script}").main()  # a returned path is not an exit status

    command.__name__ = script
    command.__doc__ = f"python -m experiments.{script}"
    return command


quickstart, paper, cross_dataset, evaluate, explain, tcav_controls = (_command(s) for s in SCRIPTS)
