"""The coupled fit's defaults, measured against the baselines of ``experiments.evaluate``.

    python -m experiments.defaults_study --model-path /tmp/eval_shapes/model --data-seed 0 \
        --ranks 12 18 24 30 --out runs/defaults_study/seed0.json

Builds the blocks of ``experiments.evaluate`` once (the quickstart's probe images, optionally drawn
with another data seed), runs every baseline at each rank (the same rank as the coupled fits), and
the coupled fit (pixels + layers, NNDSVDa start) for each of the solver settings and block-weight
variants below. Every result (per-attribute best-factor AUC, mean, worst, converged, seconds) goes
to one JSON file; ``--table`` prints markdown tables from such files.

Block-weight variants are explicit weights w_b = m_b / ||X_b||_F^2 (``frobenius`` scaled by m_b):
``frobenius`` (m = 1), ``early xK`` (the small early blocks stage1:avg, stage2:avg get m = K),
``pixels xK`` (the three pixel blocks get m = K), ``pool xK`` (the pool block gets m = K), and
combinations.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import time
from pathlib import Path

import numpy as np

EARLY = ("stage1:avg", "stage2:avg")
SOLVERS = {"mu300": ("mu", 300), "mu1000": ("mu", 1000), "hals300": ("hals", 300),
           "mu5000": ("mu", 5000), "hals3000": ("hals", 3000)}
WEIGHTS = {"frobenius": {}, "early x4": {"early": 4.0}, "early x16": {"early": 16.0},
           "pixels x0.33": {"pixels": 1 / 3}, "pixels x3": {"pixels": 3.0},
           "early x4, pixels x0.33": {"early": 4.0, "pixels": 1 / 3},
           "early x4, pool x4": {"early": 4.0, "pool": 4.0},
           "early x4, pool x4, pixels x0.33": {"early": 4.0, "pool": 4.0, "pixels": 1 / 3},
           "early x4, pool x16, pixels x0.33": {"early": 4.0, "pool": 16.0, "pixels": 1 / 3},
           "early x4, pool x4, pixels x3": {"early": 4.0, "pool": 4.0, "pixels": 3.0},
           "early x16, pool x4, pixels x3": {"early": 16.0, "pool": 4.0, "pixels": 3.0},
           "early x8, pool x4, pixels x2": {"early": 8.0, "pool": 4.0, "pixels": 2.0}}


def probe_blocks(model_path: str, data_seed: int, cache: Path | None = None):
    """(blocks {name: (rows, N)}, attributes {name: (N,)}, value names) of evaluate's probe images."""
    import jax  # noqa: F401
    import models
    from experiments import data as data_lib
    from experiments import pipeline
    from experiments.matrices import build_blocks
    from experiments.quickstart import DEFAULTS

    cfg = dataclasses.replace(DEFAULTS, model_path=model_path, tcav=False)
    train, test, probe = pipeline.load_data(cfg)
    if data_seed != cfg.seed:
        probe = data_lib.make_shapes(cfg.n_test, seed=data_seed, split="test")
    idx = (np.arange(len(probe)) if cfg.n_probe == len(probe)
           else data_lib.probe_indices(probe.labels, cfg.n_probe, seed=cfg.seed))
    attributes = {a: np.asarray(v)[idx] for a, v in probe.attributes.items()}
    names = {a: [str(x) for x in probe.attribute_names[a]] for a in attributes}
    if cache is not None and cache.exists():
        z = np.load(cache)
        order = json.loads(str(z["__order__"]))
        return {n: z[n] for n in order}, attributes, names
    model, variables, meta = models.load_model(model_path)
    layers = cfg.resolved_layers()
    base = tuple(dict.fromkeys(s.removesuffix(":avg") for s in layers))
    capture = lambda x: models.capture_activations(model, variables, x, (*base, "softmax"))
    blocks = build_blocks(probe.images[idx], capture, layers, progress=False)
    blocks = {n: np.asarray(b, np.float32) for n, b in blocks.items()}
    if cache is not None:
        cache.parent.mkdir(parents=True, exist_ok=True)
        np.savez(cache, __order__=json.dumps(list(blocks)), **blocks)
    return blocks, attributes, names


def explicit_weights(blocks: dict, variant: dict):
    """None for plain frobenius, else explicit {name: m_b / ||X_b||^2}."""
    if not variant:
        return "frobenius"
    w = {}
    for n, b in blocks.items():
        m = (variant.get("early", 1.0) if n in EARLY else variant.get("pixels", 1.0) if n.startswith("pixels")
             else variant.get("pool", 1.0) if n == "pool" else 1.0)
        w[n] = m / float(np.sum(b.astype(np.float64) ** 2))
    return w


def _scored(id_, label, scores, factor_of, rel, seconds, info, attributes, names):
    from experiments import _evaluation

    m = _evaluation.Measured(id_, label, "", scores, factor_of, rel, "", seconds, info)
    r = _evaluation._score(m, attributes, names)
    return {k: r[k] for k in ("id", "label", "per_attribute", "mean", "worst", "relative_error", "seconds", "info")}


def baselines_at(blocks, rank, attributes, names, seed=0, sae_steps=2000):
    from experiments import baselines, evaluate

    layer_names = [n for n in blocks if not n.startswith("pixels")]
    out = []
    for name in layer_names:
        t = time.perf_counter()
        s = baselines.sklearn_nmf(blocks[name], rank, max_iter=300, seed=seed)
        out.append(_scored(f"nmf[{name}]", f"NMF {name}", s.scores, s.factor_of, s.relative_error,
                           time.perf_counter() - t, s.info, attributes, names))
    pooled = np.concatenate([blocks[n].astype(np.float64) / np.linalg.norm(blocks[n].astype(np.float64))
                             for n in layer_names])
    for id_, fn in (("kmeans", lambda: baselines.kmeans(pooled, rank, seed=seed)),
                    ("pca", lambda: baselines.pca(pooled, rank, seed=seed)),
                    ("topk_sae", lambda: baselines.topk_sae(pooled, rank, max(1, rank // 4), steps=sae_steps,
                                                            learning_rate=evaluate.SAE_LEARNING_RATE, seed=seed))):
        t = time.perf_counter()
        s = fn()
        out.append(_scored(id_, id_, s.scores, s.factor_of, s.relative_error, time.perf_counter() - t, s.info,
                           attributes, names))
    return out


def coupled_at(blocks, rank, solver, iterations, weights, attributes, names, seed=0, tol=1e-5):
    import jax

    import jaxnmf
    from experiments import _evaluation

    t = time.perf_counter()
    res = jaxnmf.fit(blocks, rank, key=jax.random.key(seed), max_iter=iterations, tol=tol, init="nndsvda",
                     solver=solver, block_weights=weights)
    F = np.asarray(res.F, np.float64)
    seconds = time.perf_counter() - t
    info = dict(n_iter=res.n_iter, converged=bool(res.converged))
    return _scored("coupled", "coupled", F, np.arange(rank), _evaluation.weighted_relative_error(res, blocks),
                   seconds, info, attributes, names)


def main(argv=None):
    p = argparse.ArgumentParser()
    p.add_argument("--model-path", default="/tmp/eval_shapes/model")
    p.add_argument("--data-seed", type=int, default=0)
    p.add_argument("--ranks", type=int, nargs="+", default=[12, 18, 24, 30])
    p.add_argument("--solvers", nargs="+", default=list(SOLVERS))
    p.add_argument("--weights", nargs="+", default=list(WEIGHTS))
    p.add_argument("--no-baselines", action="store_true")
    p.add_argument("--out", required=True)
    p.add_argument("--cache", default=None)
    args = p.parse_args(argv)
    out = Path(args.out)
    done = json.loads(out.read_text()) if out.exists() else dict(data_seed=args.data_seed, runs=[])
    blocks, attributes, names = probe_blocks(args.model_path, args.data_seed,
                                             Path(args.cache) if args.cache else None)
    have = {(r["rank"], r["setting"]) for r in done["runs"]}

    def save():
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(done, indent=1))

    for rank in args.ranks:
        if not args.no_baselines and (rank, "baselines") not in have:
            for r in baselines_at(blocks, rank, attributes, names):
                done["runs"].append(dict(rank=rank, setting="baselines", **r))
            done["runs"].append(dict(rank=rank, setting="baselines", id="_marker"))
            save()
            print(f"rank {rank}: baselines done", flush=True)
        for s in args.solvers:
            for wname in args.weights:
                setting = f"{s} | {wname}"
                if (rank, setting) in have:
                    continue
                solver, iters = SOLVERS[s]
                r = coupled_at(blocks, rank, solver, iters, explicit_weights(blocks, WEIGHTS[wname]), attributes,
                               names)
                done["runs"].append(dict(rank=rank, setting=setting, **r))
                save()
                print(f"rank {rank} {setting}: mean {r['mean']:.3f} worst {r['worst']:.3f} "
                      f"{ {a: round(v, 3) for a, v in r['per_attribute'].items()} } {r['info']} "
                      f"{r['seconds']:.1f}s", flush=True)


if __name__ == "__main__":
    main()
