"""How the training presets transfer: test accuracy and epochs on data nobody tuned them on.

    python -m experiments.training_study --datasets shapes digits --seeds 0 1 2 \
        --presets plateau fast --out runs/training_study

Trains the pipeline's network (ResNet-18 at ``--width``) with each preset, on each dataset, from
each seed: the seed draws the shapes images (a new data set per seed) or the digits' train/test
split, and the network's initialisation and batches. ``fast`` is a cosine schedule over exactly
``--fast-epochs``; ``plateau`` trains until the loss on 10% of the train images, held out,
stops improving, at most ``--max-epochs`` (``models.TrainConfig.until_plateau``). Writes one JSON
record per run to ``training.json`` and a markdown table (``training.md``): test accuracy,
epochs trained, why it stopped, seconds.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import time
from pathlib import Path


def _data(name: str, seed: int, n_train: int, n_test: int):
    from experiments import data as data_lib

    if name == "shapes":
        return (data_lib.make_shapes(n_train, seed=seed, split="train"),
                data_lib.make_shapes(n_test, seed=seed, split="test"))
    return data_lib.load_digits("train", seed=seed), data_lib.load_digits("test", seed=seed)


def config_for(preset: str, *, fast_epochs: int, max_epochs: int, batch_size: int, learning_rate: float | None):
    """The `models.TrainConfig` of a preset as the pipeline builds it (the fast one, short: one warm-up epoch)."""
    import models

    if preset == "plateau":
        config = models.TrainConfig.until_plateau(max_epochs, batch_size=batch_size)
    else:
        config = models.TrainConfig(epochs=fast_epochs, batch_size=batch_size, warmup_epochs=min(1, fast_epochs - 1))
    return config if learning_rate is None else dataclasses.replace(config, learning_rate=learning_rate)


def train_once(dataset: str, seed: int, config, *, preset: str, width: int, n_train: int, n_test: int) -> dict:
    """One training run: its test accuracy, epochs, stop reason and seconds."""
    import models

    train, test = _data(dataset, seed, n_train, n_test)
    model = models.build_model("resnet18", num_classes=len(train.class_names), width=width)
    start = time.perf_counter()
    result = models.train(model, train.images, train.labels, test.images, test.labels, config, seed=seed,
                          progress=False)
    return dict(dataset=dataset, seed=seed, preset=preset, width=width, learning_rate=config.learning_rate, test_accuracy=result.test_accuracy,
                epochs=len(result.history), stopped=result.stopped, seconds=time.perf_counter() - start,
                history=list(result.history), config=dataclasses.asdict(config))


def table(records: list[dict]) -> str:
    """Markdown: one row per (dataset, preset), the test accuracy of each seed, their minimum, the epochs."""
    rows = {}
    for r in records:
        rows.setdefault((r["dataset"], r["preset"], r["width"], r["learning_rate"]), []).append(r)
    seeds = sorted({r["seed"] for r in records})
    lines = ["| data | preset | width | rate | " + " | ".join(f"seed {s}" for s in seeds) + " | worst | epochs | seconds |",
             "|---|---|---:|---:|" + "---:|" * (len(seeds) + 3)]
    for (dataset, preset, width, rate), runs in sorted(rows.items()):
        by_seed = {r["seed"]: r for r in runs}
        accuracy = [f"{by_seed[s]['test_accuracy']:.3f}" if s in by_seed else "" for s in seeds]
        epochs = "/".join(str(by_seed[s]["epochs"]) for s in seeds if s in by_seed)
        seconds = "/".join(f"{by_seed[s]['seconds']:.0f}" for s in seeds if s in by_seed)
        worst = min(r["test_accuracy"] for r in runs)
        lines.append(f"| {dataset} | {preset} | {width} | {rate:g} | " + " | ".join(accuracy) + f" | {worst:.3f} | {epochs} | "
                     f"{seconds} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m experiments.training_study", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--datasets", nargs="+", default=["shapes", "digits"], choices=["shapes", "digits"])
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--presets", nargs="+", default=["plateau", "fast"], choices=["plateau", "fast"])
    parser.add_argument("--width", type=int, default=8)
    parser.add_argument("--n-train", type=int, default=5000, help="shapes only")
    parser.add_argument("--n-test", type=int, default=1800, help="shapes only")
    parser.add_argument("--fast-epochs", type=int, default=6, help="the fast preset's epochs (the old default)")
    parser.add_argument("--max-epochs", type=int, default=30, help="the plateau preset's cap")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--learning-rate", type=float, default=None,
                        help="instead of the presets' (plateau 0.02, fast 0.1)")
    parser.add_argument("--out", type=Path, default=Path("runs/training_study"))
    args = parser.parse_args(argv)

    from experiments._atomic import write_text_atomic

    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / "training.json"
    records = json.loads(path.read_text()) if path.exists() else []  # resumes: runs already recorded are kept
    done = {(r["dataset"], r["seed"], r["preset"], r["width"], r["learning_rate"]) for r in records}
    for dataset in args.datasets:
        for seed in args.seeds:
            for preset in args.presets:
                config = config_for(preset, fast_epochs=args.fast_epochs, max_epochs=args.max_epochs,
                                    batch_size=args.batch_size, learning_rate=args.learning_rate)
                if (dataset, seed, preset, args.width, config.learning_rate) in done:
                    continue
                record = train_once(dataset, seed, config, preset=preset, width=args.width, n_train=args.n_train,
                                    n_test=args.n_test)
                records.append(record)
                write_text_atomic(path, json.dumps(records, indent=1))
                print(f"{dataset} seed {seed} {preset}: test accuracy {record['test_accuracy']:.3f} after "
                      f"{record['epochs']} epochs ({record['stopped']}), {record['seconds']:.0f} s", flush=True)
    write_text_atomic(args.out / "training.md", table(records))
    print(table(records))


if __name__ == "__main__":
    main()
