"""The scripts' command lines teach: every option says what it does, lists its values, sits in a
group, and ``--help`` answers without importing jax (issue 17)."""
import argparse
import dataclasses
import subprocess
import sys
from pathlib import Path

import pytest

from experiments import cli, cross_dataset, paper, quickstart, tcav_controls

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = {"quickstart": quickstart, "paper": paper, "cross_dataset": cross_dataset, "tcav_controls": tcav_controls}
RUN_GROUPS = ("data", "network and training", "factorisation", "validation (TCAV)", "output and run")
GROUPS = {"quickstart": RUN_GROUPS, "paper": RUN_GROUPS, "cross_dataset": RUN_GROUPS,
          "tcav_controls": ("network", "data", "validation (TCAV)", "run")}
# options that take one of a few values, in every script that has them
FIXED_VALUES = {
    "--dataset": ("shapes", "digits"),
    "--probe-dataset": ("shapes", "digits", "cifar10", "cifar100"),
    "--model": ("resnet18", "vgg11"),
    "--models": ("resnet18", "vgg11"),
    "--train-preset": ("fast", "authors"),
    "--solver": ("mu", "hals"),
    "--block-dtype": ("float32", "bfloat16"),
    "--variant": ("project", "paper", "authors"),
    "--block-weights": ("none", "frobenius"),
    "--penalty-units": ("relative", "raw"),
    "--example-groups": ("rows", "predicted"),
    "--statistics": ("cosine", "sign", "magnitude"),
}
HEAVY = {"jax", "jaxlib", "flax", "optax", "orbax", "tensorflow", "tensorflow_datasets", "matplotlib", "sklearn",
         "jaxnmf", "models"}


def options(parser: argparse.ArgumentParser):
    return [a for a in parser._actions if a.option_strings and not isinstance(a, argparse._HelpAction)]


def listed(action: argparse.Action) -> str:
    """What ``--help`` shows of the values an option takes: its metavar and help."""
    return f"{action.metavar or ''} {action.help or ''}"


@pytest.mark.parametrize("name", SCRIPTS)
def test_every_option_has_help_with_its_default(name):
    parser = SCRIPTS[name].build_parser()
    for action in options(parser):
        assert action.help and action.help is not argparse.SUPPRESS and action.help.strip(), action.option_strings
        if not (action.required or (isinstance(action, argparse._StoreTrueAction) and action.dest == "smoke")):
            assert "(default: " in action.help, action.option_strings
    parser.format_help()  # every help string formats ('%' escaped)


@pytest.mark.parametrize("name", SCRIPTS)
def test_options_with_a_few_values_list_them(name):
    parser = SCRIPTS[name].build_parser()
    by_flag = {s: a for a in options(parser) for s in a.option_strings}
    fields = {f.name: f for f in dataclasses.fields(cli.RunConfig)} if name != "tcav_controls" else {}
    for flag, values in FIXED_VALUES.items():
        if flag in by_flag:
            action = by_flag[flag]
            field = fields.get(action.dest)
            for value in (*values, *(field.metadata["choices"] if field else ())):
                assert value in (action.choices or ()) or value in listed(action), (flag, value)


@pytest.mark.parametrize("name", SCRIPTS)
def test_options_are_grouped(name):
    parser = SCRIPTS[name].build_parser()
    titles = {g.title: g for g in parser._action_groups}
    for title in GROUPS[name]:
        assert title in titles and titles[title]._group_actions, title
    ungrouped = [a.option_strings for a in titles["options"]._group_actions
                 if not isinstance(a, argparse._HelpAction)]
    assert not ungrouped


def test_single_dataset_options_say_so():
    by_flag = {a.option_strings[0]: a for a in options(quickstart.build_parser())}
    for flag in ("--train-restrict", "--n-train", "--n-test"):
        assert "shapes only" in by_flag[flag].help
    assert "CIFAR only" in by_flag["--data-dir"].help


def test_run_options_document_every_field_and_agree_with_check_config():
    """Each field's help, group and choices are its metadata; check_config accepts every listed
    value and refuses another with a message naming the option."""
    from experiments.pipeline import check_config

    base = cli.RunConfig()
    for f in dataclasses.fields(cli.RunConfig):
        assert f.metadata["help"] and f.metadata["group"] in cli.GROUPS, f.name
        if not f.metadata["choices"]:
            continue
        for value in f.metadata["choices"]:
            check_config(dataclasses.replace(base, **{f.name: value}))
        with pytest.raises(ValueError, match=f"^{cli.flag(f.name)}: "):
            check_config(dataclasses.replace(base, **{f.name: "bogus"}))


def test_the_light_lists_agree_with_the_packages():
    import models
    from experiments import data

    assert set(cli.MODELS) == set(models.LAYERS)
    assert set(cli.DATASETS) == {"shapes", "digits", *data._CIFAR_CLASS_NAMES}
    layers_help = next(f for f in dataclasses.fields(cli.RunConfig) if f.name == "layers").metadata["none"]
    for model, layers in models.DEFAULT_LAYERS.items():
        assert f"{model} {' '.join(layers)}" in layers_help


def test_paper_has_one_spelling_of_its_networks():
    parser = paper.build_parser()
    flags = {s for a in options(parser) for s in a.option_strings}
    assert "--models" in flags and "--model" not in flags
    args = parser.parse_args(["--models", "vgg11"])
    assert args.models == ["vgg11"] and cli.config_from_args(args).model == paper.DEFAULTS.model
    with pytest.raises(SystemExit):
        parser.parse_args(["--model", "vgg11"])


def test_pipeline_still_exports_the_command_line():
    from experiments import pipeline

    assert pipeline.RunConfig is cli.RunConfig and pipeline.parser_for is cli.parser_for
    assert pipeline.config_from_args is cli.config_from_args and pipeline.run_cli is cli.run_cli


def imported(*python_args: str) -> tuple[set[str], subprocess.CompletedProcess]:
    """Top-level packages a fresh interpreter imports running ``python -X importtime ARGS``."""
    done = subprocess.run([sys.executable, "-X", "importtime", *python_args], cwd=ROOT, capture_output=True,
                          text=True, timeout=120)
    names = {line.rsplit("|", 1)[1].strip().split(".")[0] for line in done.stderr.splitlines()
             if line.startswith("import time:") and line.count("|") == 2}
    return names, done


def test_the_import_check_sees_imports():
    names, _ = imported("-c", "import json, argparse")
    assert {"json", "argparse"} <= names


@pytest.mark.parametrize("name", ["quickstart", "paper", "cross_dataset"])
def test_help_imports_no_heavy_package(name):
    names, done = imported("-m", f"experiments.{name}", "--help")
    assert done.returncode == 0 and "usage:" in done.stdout, done.stderr[-2000:]
    assert not names & HEAVY, sorted(names & HEAVY)


@pytest.mark.parametrize("name", ["quickstart", "paper", "cross_dataset"])
def test_no_options_give_the_scripts_defaults(name):
    script = SCRIPTS[name]
    args = script.build_parser().parse_args([])
    assert cli.config_from_args(args) == script.DEFAULTS and not args.smoke
    args = script.build_parser().parse_args(["--probe-dataset", "", "--layers", "stage3", "pool:avg", "--no-pixels",
                                            "--rank", "5", "--tol", "0", "--l2", "0.5"])
    cfg = cli.config_from_args(args)
    assert (cfg.probe_dataset, cfg.layers, cfg.pixels, cfg.rank, cfg.tol, cfg.l2) == (
        None, ("stage3", "pool:avg"), False, 5, 0.0, 0.5)


def test_console_commands_are_declared_and_run_their_script(monkeypatch):
    import importlib
    import sys
    from pathlib import Path

    tomllib = pytest.importorskip("tomllib")  # Python >= 3.11 (the project supports 3.10)

    from experiments import console

    scripts = tomllib.loads((Path(__file__).resolve().parents[1] / "pyproject.toml").read_text())["project"]["scripts"]
    assert scripts == {f"jaxnmf-{s.replace('_', '-')}": f"experiments.console:{s}" for s in console.SCRIPTS}
    for script in console.SCRIPTS:
        module = importlib.import_module(f"experiments.{script}")
        called = []
        monkeypatch.setattr(module, "main", lambda argv=None: called.append(sys.argv) or Path("report.html"))
        assert getattr(console, script)() is None and called  # a returned path does not become the exit status


@pytest.mark.parametrize("script", ["paper", "cross_dataset"])
def test_smoke_refuses_an_option_it_would_override(script, tmp_path, capsys):
    import importlib
    module = importlib.import_module(f"experiments.{script}")
    with pytest.raises(SystemExit):
        module.main(["--smoke", "--rank", "50", "--out", str(tmp_path)])
    assert "--rank: --smoke overrides --rank" in capsys.readouterr().err
    assert not any(tmp_path.iterdir())


def test_options_have_one_spelling_no_prefixes(capsys):
    from experiments import quickstart
    with pytest.raises(SystemExit):
        quickstart.build_parser().parse_args(["--ran", "5"])
    assert "unrecognized arguments: --ran" in capsys.readouterr().err


def test_block_emphasis_multiplies_the_frobenius_weights():
    import jax.numpy as jnp
    import numpy as np
    from experiments.matrices import emphasised_weights

    rng = np.random.default_rng(0)
    blocks = {"pixels_r": rng.random((6, 5)), "pixels_g": rng.random((6, 5)).astype(np.float32),
              "stage1:avg": jnp.asarray(rng.random((3, 5)), jnp.float32), "pool": np.zeros((2, 5))}
    cfg = cli.RunConfig(block_emphasis=("stage1:avg=8", "pixels=2", "stage9=3"))
    assert cfg.emphasis() == {"stage1:avg": 8.0, "pixels": 2.0, "stage9": 3.0}
    weights = cfg.fit_options(blocks)["block_weights"]
    assert weights == emphasised_weights(blocks, cfg.emphasis())
    sq = {name: float(np.sum(np.square(np.asarray(x, np.float64)))) for name, x in blocks.items()}
    assert weights["pixels_r"] == pytest.approx(2 / sq["pixels_r"]) and weights["pixels_g"] == pytest.approx(2 / sq["pixels_g"])
    assert weights["stage1:avg"] == pytest.approx(8 / sq["stage1:avg"], rel=1e-6) and weights["pool"] == 0.0
    assert cli.RunConfig().fit_options(blocks)["block_weights"] == "frobenius"  # no emphasis: unchanged


@pytest.mark.parametrize("emphasis, variant, message", [
    (("stage3",), "project", "--block-emphasis: 'stage3' is not NAME=FACTOR"),
    (("stage3=-1",), "project", "--block-emphasis: 'stage3=-1' is not NAME=FACTOR"),
    (("stage3=inf",), "project", "is not NAME=FACTOR with a positive finite FACTOR"),
    (("stage9=2",), "project", "--block-emphasis: no block named stage9"),
    (("stage3=2",), "paper", "--block-emphasis: multiplies frobenius block weights"),
])
def test_block_emphasis_is_checked_before_any_work(emphasis, variant, message):
    from experiments.pipeline import check_config
    with pytest.raises(ValueError, match=message):
        check_config(cli.RunConfig(block_emphasis=emphasis, variant=variant, layers=("stage3", "pool")))
