"""Perturbation-response prediction: every ``sft.tl.predict_perturbation`` method and baseline.

Two held-out tasks, all methods in one run, each scored by ``sft.tl.perturbation_metrics``
(cell-eval's metrics on mean profiles) next to the split-half replicate ceiling:

* **Norman 2019 doubles** (``norman2019_crispra_k562_500hvg.h5ad``, CRISPRa in K562): each of
  the 9 double perturbations is held out in turn; the predictors learn from the control, the
  18 singles and the other 8 doubles. Doubles are also reported by how many of their two genes
  were perturbed alone in training (GEARS' "seen 2/2" ... "seen 0/2").
* **Held-out singles, 5-fold by perturbation**, on Norman (the 18 singles; doubles that contain
  a held-out gene are left out of training too) and on Papalexi 2021
  (``papalexi2021_eccite_lowmoi_perturb.h5ad``, CRISPR knockouts in THP-1; cells without a
  confident guide dropped, knockouts with >= ``--min-cells`` cells).

All predictions of a task are scored together, so the discrimination score ranks each
prediction among all held-out perturbations of the task. ``replicate ceiling`` is one random
half of each perturbation's (and the control's) cells predicting the other half, its mean scores
lifted from half to full depth by the Spearman-Brown formula ``2r / (1 + r)`` as cell-eval
does (no ceiling for the MAE, nor where ``r <= 0``).

    python benchmarks/bench_perturbation.py [--folds 5] [--top-de 20] [--min-cells 100]

Writes ``benchmarks/results/perturbation.{json,md,png}``.
"""

from __future__ import annotations

import argparse
import logging
import time

import numpy as np

from _common import (
    RESULTS_DIR,
    log,
    machine_info,
    markdown_table,
    set_threads,
    shared_path,
    write_results,
)

NAME = "perturbation"
NORMAN = "norman2019_crispra_k562_500hvg.h5ad"
PAPALEXI = "papalexi2021_eccite_lowmoi_perturb.h5ad"
CONTROL, KEY = "control", "perturbation"
# (label, method, model, options): every predictor of the run.
PREDICTORS = [
    ("control", "control", None, {}),
    ("mean", "mean", None, {}),
    ("additive", "additive", None, {}),
    ("linear (scgpt-default)", "linear", "scgpt-default", {}),
    ("linear (cellplm-default)", "linear", "cellplm-default", {}),
    ("gears (scgpt-default)", "gears", "scgpt-default", {}),
    # A CPU budget, far below the tutorial's 15 epochs over every cell: see the results' notes.
    (
        "finetune (scgpt-default)",
        "finetune",
        "scgpt-default",
        {"max_epochs": 3, "cells_per_perturbation": 16, "control_cells": 64},
    ),
]
CEILING = "replicate ceiling"
BASELINES = ("control", "mean", "additive")
# What the table cannot say by itself (written for the committed run; revise with new results).
NOTES = """\
## Reading the verdict

- `linear` is the additive sum wherever both genes of a double were perturbed alone in
  training: on the four "seen 2/2" doubles it scores exactly as `additive`. Its margin on the
  doubles comes from the one double of two unseen genes (BPGM+SAMD1), a single perturbation.
- `gears` has the best discrimination score on the held-out doubles and the lowest MAE there;
  it loses on Pearson delta over the top-20 DE genes in every task.
- `finetune` ran on a CPU budget: 3 epochs, 16 cells per perturbation and epoch, 64 control
  cells per prediction, from the shipped 64-wide scGPT (the tutorial: 15 epochs over every
  cell, 300 control cells, a 512-wide pretrained scGPT, a GPU). Its decoder starts as "no
  change" (`start_from_control`), so its MAE of delta stays near that of no change (in the
  previous run, from the tutorial's random start, it was 3-7 times higher), but the changes
  it predicts barely follow the observed ones (top-20 DE Pearson delta 0.03-0.16). Its
  discrimination score is the highest on held-out singles (0.54 Norman, 0.55 Papalexi) with
  so little correlation, so that score alone says little. This is no verdict on scGPT's
  fine-tuning at the tutorial's scale; it is what the shipped default gives in minutes on a
  CPU.
- The shipped default models are small and were pretrained on a few thousand PBMC and
  cell-line cells (`cellplm-default` also saw the Norman cells, unlabelled); their
  vocabularies lack KLF1, CNN1, FOXL2, HOXB9, RUNX1T1 and PDCD1LG2, which is why some
  perturbations were refused. An official checkpoint may do better; none could be fetched here.
- `method=None` in `sft.tl.predict_perturbation` is `additive`: no model-based method beats
  it on the top-20 DE Pearson delta on more held-out perturbations than it loses, and it needs
  no training. `finetune` and `gears` took most of the run's time.
"""
HEADLINE = ("pearson_delta_top_de", "discrimination_l1")
METRICS = (
    "pearson_delta_top_de",
    "pearson_delta",
    "de_overlap",
    "de_direction",
    "mae_delta",
    "discrimination_l1",
)


def _load(data_dir, name: str, min_cells: int):
    import anndata as ad

    adata = ad.read_h5ad(data_dir / name)
    counts = adata.obs[KEY].value_counts()
    keep = [
        p for p in counts.index if p == CONTROL or (p != "unassigned" and counts[p] >= min_cells)
    ]
    return adata[adata.obs[KEY].isin(keep)].copy()


def _predict_all(train, test: list[str], seconds: dict[str, float], refused: dict) -> dict:
    """Every predictor's predictions of ``test``, learnt from ``train``.

    A perturbation a method refuses (a gene outside its model's vocabulary that training never
    perturbed alone) is left out of that method's predictions and recorded in ``refused``.
    """
    import scfm_tools as sft
    from scfm_tools._errors import InputError

    out = {}
    for label, method, model, options in PREDICTORS:
        started = time.perf_counter()
        kwargs = {"method": method, "model": model, **options}
        try:
            out[label] = sft.tl.predict_perturbation(train, test, **kwargs)
        except InputError:
            fine = []
            for name in test:
                try:
                    sft.tl.predict_perturbation(train, [name], **kwargs)
                    fine.append(name)
                except InputError:
                    refused.setdefault(label, []).append(name)
            if fine:
                out[label] = sft.tl.predict_perturbation(train, fine, **kwargs)
        seconds[label] = seconds.get(label, 0.0) + time.perf_counter() - started
    return out


def _concat(parts: list[dict]) -> dict:
    """One AnnData per method over all folds, restricted to what every method predicted."""
    import anndata as ad

    labels = [label for label, *_ in PREDICTORS]
    joined = {
        label: ad.concat([p[label] for p in parts if label in p], merge="first") for label in labels
    }
    common = set.intersection(*(set(joined[label].obs[KEY].astype(str)) for label in labels))
    return {
        label: pred[pred.obs[KEY].astype(str).isin(common).to_numpy()].copy()
        for label, pred in joined.items()
    }


def held_out_doubles(
    adata, seconds: dict[str, float], refused: dict
) -> tuple[dict, dict[str, int]]:
    labels = adata.obs[KEY].astype(str)
    doubles = sorted(p for p in labels.unique() if "+" in p)
    singles = set(labels.unique()) - {CONTROL, *doubles}
    parts = []
    for double in doubles:
        log(f"Norman doubles: holding out {double}")
        parts.append(_predict_all(adata[labels != double].copy(), [double], seconds, refused))
    seen = {d: sum(g in singles for g in d.split("+")) for d in doubles}
    return _concat(parts), seen


def held_out_singles(
    adata, folds: int, seed: int, seconds: dict[str, float], refused: dict, name: str
) -> dict:
    labels = adata.obs[KEY].astype(str)
    singles = sorted(p for p in labels.unique() if p != CONTROL and "+" not in p)
    rng = np.random.default_rng(seed)
    fold_of = dict(zip(rng.permutation(singles), np.arange(len(singles)) % folds, strict=True))
    parts = []
    for fold in range(folds):
        test = [p for p in singles if fold_of[p] == fold]
        # A double with a held-out gene would show that gene's effect: out of training too.
        out = np.array([any(g in test for g in p.split("+")) for p in labels])
        log(f"{name} singles: fold {fold + 1}/{folds}, {len(test)} held out")
        parts.append(_predict_all(adata[~out].copy(), test, seconds, refused))
    return _concat(parts)


def _spearman_brown(r: float | None) -> float | None:
    """Half-depth reliability -> full depth, ``2r / (1 + r)``; undefined at ``r <= 0``."""
    return 2 * r / (1 + r) if r is not None and r > 0 else None


def _summary(frame, task: str, subset: str = "all") -> list[dict]:
    """Means over perturbations; the ceiling's corrected to full depth as cell-eval does."""
    rows = []
    for method, sub in frame.groupby("method", sort=False):
        row = {"task": task, "subset": subset, "method": method, "n": len(sub)}
        for m in METRICS:
            values = sub[m].to_numpy(dtype=float)
            row[m] = float(np.nanmean(values)) if np.isfinite(values).any() else None
            if method == CEILING:
                # Error metrics have no full-depth ceiling (cell-eval reports none either).
                row[m] = None if m == "mae_delta" else _spearman_brown(row[m])
        rows.append(row)
    return rows


def _figure(tables: dict, predictions: dict, observed: dict, top_de: int) -> None:
    """Predicted vs observed deltas on each held-out perturbation's top DE genes."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = [label for label, *_ in PREDICTORS if label != "control"]
    fig, axes = plt.subplots(
        len(tables), len(labels), figsize=(2.4 * len(labels), 2.4 * len(tables)), squeeze=False
    )
    for r, task in enumerate(tables):
        obs_delta, tops = observed[task]
        for c, label in enumerate(labels):
            ax = axes[r, c]
            pred = predictions[task][label]
            xs, ys = [], []
            for name, top in tops.items():
                row = pred[pred.obs[KEY].astype(str) == name]
                delta = np.asarray(row.X).ravel() - pred.var["control_mean"].to_numpy()
                xs.append(obs_delta[name][top])
                ys.append(delta[top])
            x, y = np.concatenate(xs), np.concatenate(ys)
            lim = float(max(np.abs(x).max(), np.abs(y).max(), 1e-3)) * 1.05
            ax.scatter(x, y, s=4, alpha=0.5)
            ax.plot([-lim, lim], [-lim, lim], color="grey", lw=0.6)
            ax.set_xlim(-lim, lim)
            ax.set_ylim(-lim, lim)
            ax.set_title(f"{label}" if r == 0 else "", fontsize=8)
            if c == 0:
                ax.set_ylabel(f"{task}\npredicted delta", fontsize=7)
            if r == len(tables) - 1:
                ax.set_xlabel("observed delta", fontsize=7)
            ax.tick_params(labelsize=6)
    fig.suptitle(
        f"Held-out perturbations: predicted vs observed delta, top {top_de} DE genes", fontsize=9
    )
    fig.tight_layout()
    fig.savefig(RESULTS_DIR / f"{NAME}.png", dpi=110)
    plt.close(fig)


def _observed(adata, frame, top_de: int) -> tuple[dict, dict]:
    """Observed deltas and top DE genes of the scored perturbations (for the figure)."""
    from scfm_tools.models.perturbation import PerturbationData
    from scfm_tools.tl._perturbation_metrics import welch_t

    data = PerturbationData.from_anndata(adata, KEY, CONTROL)
    names = sorted(set(frame["perturbation"]))
    delta = {n: data.delta(n) for n in names}
    control_rows = data.rows[CONTROL]
    tops = {
        n: np.argsort(-np.abs(welch_t(data.X, data.rows[n], control_rows)))[:top_de] for n in names
    }
    return delta, tops


def _refused_text(refused: dict) -> str:
    names = {task: sorted({n for ns in by.values() for n in ns}) for task, by in refused.items()}
    said = [f"{task}: {', '.join(ns)}" for task, ns in names.items() if ns]
    return "; ".join(said) or "none"


def main() -> None:
    import scfm_tools as sft

    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--folds", type=int, default=5)
    parser.add_argument("--top-de", type=int, default=20)
    parser.add_argument("--min-cells", type=int, default=100)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    set_threads(args.threads)
    logging.getLogger("scfm_tools").setLevel(logging.ERROR)
    sft.settings.progress_bar = False
    data_dir = shared_path("SFT_DATA", "../shared/data")
    started = time.perf_counter()

    norman = _load(data_dir, NORMAN, 0)
    papalexi = _load(data_dir, PAPALEXI, args.min_cells)
    seconds: dict[str, float] = {}
    refused: dict[str, dict[str, list[str]]] = {}
    predictions = {}
    task = "Norman doubles"
    predictions[task], seen = held_out_doubles(norman, seconds, refused.setdefault(task, {}))
    task = "Norman singles"
    predictions[task] = held_out_singles(
        norman, args.folds, args.seed, seconds, refused.setdefault(task, {}), "Norman"
    )
    task = "Papalexi singles"
    predictions[task] = held_out_singles(
        papalexi, args.folds, args.seed, seconds, refused.setdefault(task, {}), "Papalexi"
    )
    observed_data = {
        "Norman doubles": norman,
        "Norman singles": norman,
        "Papalexi singles": papalexi,
    }

    tables, summary, observed = {}, [], {}
    for task, preds in predictions.items():
        frame = sft.tl.perturbation_metrics(
            observed_data[task], preds, top_de=args.top_de, ceiling=True, random_state=args.seed
        )
        tables[task] = frame
        summary += _summary(frame, task)
        observed[task] = _observed(observed_data[task], frame[frame.method == CEILING], args.top_de)
    doubles = tables["Norman doubles"]
    for k in sorted(set(seen.values()), reverse=True):
        names = [d for d, s in seen.items() if s == k]
        summary += _summary(
            doubles[doubles.perturbation.isin(names)], "Norman doubles", f"seen {k}/2"
        )
    _figure(tables, predictions, observed, args.top_de)

    # The best model-based method against the better of mean and additive, per headline
    # metric: it beats them when its mean is higher and it wins on more perturbations than it
    # loses (a tie, e.g. the same additive sum, counts for neither).
    models = [label for label, method, *_ in PREDICTORS if method not in BASELINES]
    verdicts = []
    for task, frame in tables.items():
        rows = {r["method"]: r for r in summary if r["task"] == task and r["subset"] == "all"}
        per = frame.set_index(["method", "perturbation"])
        for k in HEADLINE:
            best = max(models, key=lambda m: rows[m][k] if rows[m][k] is not None else -np.inf)
            baseline = max(BASELINES[1:], key=lambda b: rows[b][k])
            diff = (per.loc[best, k] - per.loc[baseline, k]).to_numpy(dtype=float)
            wins, losses = int((diff > 1e-9).sum()), int((diff < -1e-9).sum())
            verdicts.append(
                {
                    "task": task,
                    "metric": k,
                    "best_model_method": best,
                    "value": rows[best][k],
                    "best_baseline": baseline,
                    "baseline_value": rows[baseline][k],
                    "wins": wins,
                    "losses": losses,
                    "beats_baselines": bool(rows[best][k] > rows[baseline][k] and wins > losses),
                }
            )

    columns = [
        ("task", "task"),
        ("subset", "held out"),
        ("method", "predictor"),
        ("n", "n"),
        ("pearson_delta_top_de", "Pearson delta, top-20 DE"),
        ("discrimination_l1", "discrimination (L1)"),
        ("pearson_delta", "Pearson delta, all genes"),
        ("de_overlap", "DE overlap"),
        ("de_direction", "DE direction"),
        ("mae_delta", "MAE of delta"),
    ]
    lines = [
        f"- {v['task']}, {v['metric']}: best model-based `{v['best_model_method']}` "
        f"{v['value']:.3f} vs `{v['best_baseline']}` {v['baseline_value']:.3f} (higher on "
        f"{v['wins']}, lower on {v['losses']} held-out perturbations): "
        + ("**beats** mean and additive" if v["beats_baselines"] else "does **not** beat them")
        for v in verdicts
    ]
    markdown = (
        "# Perturbation-response prediction: methods against the baselines\n\n"
        f"`python benchmarks/bench_perturbation.py` ({time.perf_counter() - started:.0f} s on "
        f"{args.threads} thread(s)). Norman 2019 ({norman.n_obs:,} cells, {norman.n_vars} genes): "
        f"each of the {len(seen)} doubles held out in turn; held-out singles {args.folds}-fold by "
        f"perturbation on Norman and on Papalexi 2021 ({papalexi.n_obs:,} cells with a guide, "
        f"{papalexi.n_vars} genes, knockouts with >= {args.min_cells} cells). Metrics: "
        "`sft.tl.perturbation_metrics` (cell-eval's definitions on mean profiles, top "
        f"{args.top_de} DE genes by Welch |t|), means over held-out perturbations; "
        "`replicate ceiling`: split-half scores corrected to full depth by Spearman-Brown "
        "(`2r/(1+r)`, as cell-eval; none for the MAE or where `r <= 0`). `control` predicts "
        "no change, so its Pearson values are undefined. Every method is scored on the "
        "perturbations all of them predict; refused (gene outside the model's vocabulary, "
        f"never perturbed alone in training) and so left out: {_refused_text(refused)}.\n\n"
        "## Verdict\n\n"
        + "\n".join(lines)
        + "\n\n"
        + NOTES
        + "\n## All metrics\n\n"
        + markdown_table(summary, columns)
        + f"\n\n![Predicted vs observed deltas]({NAME}.png)\n"
    )
    write_results(
        NAME,
        {
            "machine": machine_info(args.threads),
            "settings": vars(args),
            "seconds_per_predictor": seconds,
            "doubles_seen": seen,
            "refused": refused,
            "verdicts": verdicts,
            "summary": summary,
            "per_perturbation": {t: f.to_dict(orient="records") for t, f in tables.items()},
        },
        markdown,
    )
    print(markdown)


if __name__ == "__main__":
    main()
