"""Batch integration: ``sft.tl.integrate`` against scVI, Harmony, HVG+PCA and zero-shot embeddings.

On every shared dataset with batches, in one run and on the same cells:

* ``sft.tl.integrate`` with each family and recipe: scGPT ``official`` (GEP + GEPC + ECS + DAR +
  DSBN, the official integration fine-tuning) and ``batch_decoder``; CellPLM ``adversarial``
  (batch-aware decoder + adversarial batch classifier) and ``batch_decoder``; each from the
  shipped default model;
* the zero-shot embeddings of the same models (``sft.tl.embed_cells``);
* with ``--unseen``, integrate's default from a CellPLM pretrained with the shipped default's
  recipe on every shared file but the dataset (the default itself saw them all, unlabelled);
* scVI (scvi-tools, 10 latent dimensions, the batch as covariate, scvi-tools' default number of
  epochs), Harmony (harmonypy from PyPI, default settings, on the PCA below) and HVG+PCA
  (50 components of the log-normalised 2,000 most variable genes).

Each embedding is scored with scib-metrics' ``Benchmarker``: bio conservation (isolated labels,
k-means NMI/ARI, silhouette, cLISI) where the cells have labels, batch correction (BRAS, iLISI,
kBET, graph connectivity, PCR comparison against the PCA) everywhere, and the total
(0.6 bio + 0.4 batch); raw scores, not min-max scaled.

Datasets: CellBench (3 cell lines, CEL-seq2 vs Drop-seq, labelled) and the three 10x PBMC
chemistries (unlabelled: batch correction only; ``--pbmc-cells`` cells, the same number from
each chemistry, to fit a CPU run).

    python benchmarks/bench_integration.py --threads 1 [--pbmc-cells 1200] \
        [--scgpt-genes 400] [--scgpt-epochs N] [--datasets cellbench pbmc] \
        [--integrations X_cellplm_adversarial X_scgpt_official ...]

scGPT reads every one of its genes for every cell (the official recipe's 1,200 genes make
sequences of 1,201 tokens); ``--scgpt-genes`` lowers that for a CPU run (the results say what
ran). Writes ``benchmarks/results/integration.{json,md,png}`` and the scib-metrics tables
``integration_<dataset>.svg`` (``--name`` changes the stem, so that a run of one dataset keeps
the results of another). The shipped default models were pretrained (without labels) on
cells of these files; their cards say so.
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np

from _baselines import cellplm_without, harmony_embedding, pca_embedding, scvi_embedding
from _common import (
    RESULTS_DIR,
    load_average,
    log,
    machine_info,
    markdown_table,
    set_threads,
    shared_path,
    write_results,
)

NAME = "integration"
# dataset -> (label key or None, batch key)
DATASETS = {
    "cellbench_3celllines_celseq2_dropseq.h5ad": ("cell_type", "batch"),
    "pbmc_10x_3chemistries_unlabeled.h5ad": (None, "batch"),
}
# (key, model, method): the integrations run, in table order
INTEGRATIONS = (
    ("X_cellplm_adversarial", "cellplm-default", "adversarial"),
    ("X_cellplm_batch_decoder", "cellplm-default", "batch_decoder"),
    ("X_scgpt_official", "scgpt-default", "official"),
    ("X_scgpt_batch_decoder", "scgpt-default", "batch_decoder"),
)
PCA_KEY = "X_pca"
# integrate's default from a CellPLM pretrained without the dataset (--unseen)
UNSEEN_KEY = "X_cellplm_adversarial_unseen"
BASELINES = {
    PCA_KEY: "HVG+PCA",
    "X_harmony": "Harmony",
    "X_scvi": "scVI",
    "X_scgpt": "scgpt-default zero-shot",
    "X_cellplm": "cellplm-default zero-shot",
}
NO_LABEL = "_no_label"
SCORES = ("Bio conservation", "Batch correction", "Total")
METRICS = (
    "Isolated labels",
    "KMeans NMI",
    "KMeans ARI",
    "Silhouette label",
    "cLISI",
    "BRAS",
    "iLISI",
    "KBET",
    "Graph connectivity",
    "PCR comparison",
)


def _load(name: str, data_dir: Path, n_pbmc: int):
    import anndata as ad

    adata = ad.read_h5ad(data_dir / name)
    label_key, batch_key = DATASETS[name]
    if label_key is None and n_pbmc < adata.n_obs:
        # the same number of cells from each batch, drawn with a fixed seed
        rng = np.random.default_rng(0)
        per_batch = n_pbmc // adata.obs[batch_key].nunique()
        keep = np.concatenate(
            [
                rng.choice(np.flatnonzero(adata.obs[batch_key] == b), per_batch, replace=False)
                for b in adata.obs[batch_key].unique()
            ]
        )
        adata = adata[np.sort(keep)].copy()
    return adata


def _scib(adata, keys: list[str], label_key: str | None, batch_key: str):
    """scib-metrics scores per embedding key (raw), and the results table as an SVG."""
    import matplotlib

    matplotlib.use("Agg")
    from scib_metrics.benchmark import BatchCorrection, Benchmarker, BioConservation

    data = adata.copy()
    if label_key is None:
        label_key = NO_LABEL
        data.obs[label_key] = "all"
    bench = Benchmarker(
        data,
        batch_key=batch_key,
        label_key=label_key,
        embedding_obsm_keys=keys,
        bio_conservation_metrics=None if label_key == NO_LABEL else BioConservation(),
        batch_correction_metrics=BatchCorrection(),
        pre_integrated_embedding_obsm_key=PCA_KEY,
        progress_bar=False,
    )
    bench.benchmark()
    table = bench.get_results(min_max_scale=False).drop(index="Metric Type", errors="ignore")
    return bench, {key: {k: float(v) for k, v in table.loc[key].items()} for key in keys}


def _save_table(bench, dataset: str, name: str) -> str:
    """Plot scib-metrics' results table into results/<name>_<dataset>.svg."""
    import matplotlib.pyplot as plt

    stem = f"{name}_{dataset.removesuffix('.h5ad').split('_')[0]}"
    with tempfile.TemporaryDirectory() as tmp:
        bench.plot_results_table(min_max_scale=False, show=False, save_dir=tmp)
        shutil.copy(Path(tmp) / "scib_results.svg", RESULTS_DIR / f"{stem}.svg")
    plt.close("all")
    return f"{stem}.svg"


def _figure(rows: list[dict], name: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    datasets = list(dict.fromkeys(r["dataset"] for r in rows))
    fig, axes = plt.subplots(1, len(datasets), figsize=(6 * len(datasets), 4.2), squeeze=False)
    for ax, dataset in zip(axes[0], datasets, strict=True):
        sub = [r for r in rows if r["dataset"] == dataset]
        x = np.arange(len(sub))
        for offset, key in zip((-0.25, 0.0, 0.25), SCORES, strict=True):
            values = [r.get(key) if r.get(key) is not None else np.nan for r in sub]
            ax.bar(x + offset, values, width=0.25, label=key)
        ax.set_xticks(x, [r["method"] for r in sub], rotation=40, ha="right", fontsize=7)
        ax.set_ylim(0, 1)
        ax.set_title(dataset.removesuffix(".h5ad"), fontsize=9)
    axes[0][0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(RESULTS_DIR / f"{name}.png", dpi=120)
    plt.close(fig)


def _run_dataset(name: str, adata, args) -> tuple[list[dict], str]:
    import scfm_tools as sft

    label_key, batch_key = DATASETS[name]
    seconds: dict[str, float] = {}
    methods: dict[str, str] = {}

    def timed(key: str, label: str, fn) -> None:
        log(f"{name}: {label}")
        started = time.perf_counter()
        fn()
        seconds[key] = time.perf_counter() - started
        methods[key] = label

    def put(key: str, value) -> None:
        adata.obsm[key] = np.asarray(value, dtype=np.float32)

    timed(PCA_KEY, BASELINES[PCA_KEY], lambda: put(PCA_KEY, pca_embedding(adata)))
    timed(
        "X_harmony",
        BASELINES["X_harmony"],
        lambda: put("X_harmony", harmony_embedding(adata.obsm[PCA_KEY], adata.obs[batch_key])),
    )
    timed(
        "X_scvi",
        BASELINES["X_scvi"],
        lambda: put("X_scvi", scvi_embedding(adata, batch_key, args.scvi_epochs)),
    )
    timed("X_scgpt", BASELINES["X_scgpt"], lambda: sft.tl.embed_cells(adata, "scgpt-default"))
    timed(
        "X_cellplm",
        BASELINES["X_cellplm"],
        lambda: sft.tl.embed_cells(adata, "cellplm-default", batch_key=batch_key),
    )
    for key, model, method in INTEGRATIONS:
        if key not in args.integrations:
            continue
        options = {}
        if model.startswith("scgpt"):
            options = {"n_top_genes": args.scgpt_genes}
            if args.scgpt_epochs is not None:
                options["max_epochs"] = args.scgpt_epochs
        timed(
            key,
            f"integrate {model.split('-')[0]} {method}",
            lambda key=key, model=model, method=method, options=options: sft.tl.integrate(
                adata, batch_key, model=model, method=method, key_added=key, **options
            ),
        )
    if args.unseen:
        _integrate_unseen(name, adata, batch_key, args, timed)
    keys = list(seconds)
    log(f"{name}: scib-metrics on {len(keys)} embeddings")
    bench, scib = _scib(adata, keys, label_key, batch_key)
    table_file = _save_table(bench, name, args.name)
    rows = [
        {
            "dataset": name,
            "n_cells": adata.n_obs,
            "n_batches": int(adata.obs[batch_key].nunique()),
            "labelled": label_key is not None,
            "method": methods[key],
            "key": key,
            "seconds": seconds[key],
            "epochs": adata.uns.get(key[2:], {}).get("params", {}).get("max_epochs"),
            **scib[key],
        }
        for key in keys
    ]
    return rows, table_file


def _integrate_unseen(name: str, adata, batch_key: str, args, timed) -> None:
    """The default integration from a CellPLM pretrained (same recipe) without this dataset."""
    import scfm_tools as sft

    with tempfile.TemporaryDirectory() as scratch:
        folder, trained = cellplm_without(name, Path(scratch), args.unseen_epochs, args.trained_dir)
        log(f"{name}: CellPLM recipe without it, trained in {trained} s (None: reused)")
        timed(
            UNSEEN_KEY,
            "integrate cellplm adversarial, pretrained without D",
            lambda: sft.tl.integrate(
                adata, batch_key, model=str(folder), method="adversarial", key_added=UNSEEN_KEY
            ),
        )


def _verdicts(rows: list[dict]) -> list[str]:
    """One line per dataset: where the default integrate stands against scVI, Harmony, PCA."""
    lines = []
    for dataset in dict.fromkeys(r["dataset"] for r in rows):
        by = {r["key"]: r for r in rows if r["dataset"] == dataset}
        labelled = by[PCA_KEY]["labelled"]
        score = "Total" if labelled else "Batch correction"
        for key in [*(k for k, _, _ in INTEGRATIONS), UNSEEN_KEY]:
            if key not in by:
                continue
            r = by[key]
            parts = [
                f"{score.lower()} {r[score]:.3f} vs scVI {by['X_scvi'][score]:.3f} "
                f"({'>=' if r[score] >= by['X_scvi'][score] else '<'} scVI), Harmony "
                f"{by['X_harmony'][score]:.3f}"
            ]
            if labelled:
                bio, pca_bio = r["Bio conservation"], by[PCA_KEY]["Bio conservation"]
                parts.append(
                    f"bio {bio:.3f} vs HVG+PCA {pca_bio:.3f} ({'>=' if bio >= pca_bio else '<'})"
                )
            lines.append(f"- {dataset.removesuffix('.h5ad')}, {r['method']}: " + "; ".join(parts))
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--pbmc-cells", type=int, default=1200)
    parser.add_argument("--scgpt-genes", type=int, default=400)
    parser.add_argument(
        "--scgpt-epochs", type=int, default=None, help="default: integrate's own (step budget)"
    )
    parser.add_argument(
        "--scvi-epochs", type=int, default=None, help="default: scvi-tools' own heuristic"
    )
    parser.add_argument(
        "--datasets",
        nargs="+",
        default=["cellbench", "pbmc"],
        help="datasets to run, by the first word of the file name",
    )
    parser.add_argument(
        "--integrations",
        nargs="+",
        default=[key for key, _, _ in INTEGRATIONS],
        choices=[key for key, _, _ in INTEGRATIONS],
        help="integrations to run (default: all)",
    )
    parser.add_argument(
        "--unseen",
        action="store_true",
        help="also integrate from a CellPLM pretrained with the default's recipe without the "
        "dataset (scripts/train_default_cellplm.py --exclude)",
    )
    parser.add_argument("--unseen-epochs", type=int, default=10, help="its pretraining epochs")
    parser.add_argument(
        "--trained-dir",
        type=Path,
        help="with --unseen: folder whose without_<file stem> subfolders hold models that "
        "scripts/train_default_cellplm.py --exclude <file> wrote; trained afresh where absent",
    )
    parser.add_argument(
        "--name",
        default=NAME,
        help="stem of the result files (another name keeps the results of an earlier run)",
    )
    args = parser.parse_args()
    set_threads(args.threads)
    data_dir = shared_path("SFT_DATA", "../shared/data")
    rows, tables = [], []
    for name in [n for n in DATASETS if n.split("_")[0] in args.datasets]:
        adata = _load(name, data_dir, args.pbmc_cells)
        dataset_rows, table = _run_dataset(name, adata, args)
        rows.extend(dataset_rows)
        tables.append(table)
    columns = [
        ("dataset", "dataset"),
        ("n_cells", "cells"),
        ("n_batches", "batches"),
        ("method", "embedding"),
        *[(k, k) for k in SCORES],
        ("epochs", "epochs"),
        ("seconds", "s"),
    ]
    detail = [("dataset", "dataset"), ("method", "embedding"), *[(k, k) for k in METRICS]]
    markdown = (
        "# Batch integration against scVI, Harmony and HVG+PCA\n\n"
        f"`python benchmarks/bench_integration.py --threads {args.threads} --pbmc-cells "
        f"{args.pbmc_cells} --scgpt-genes {args.scgpt_genes}"
        + (f" --scgpt-epochs {args.scgpt_epochs}" if args.scgpt_epochs else "")
        + f" --datasets {' '.join(args.datasets)} --integrations {' '.join(args.integrations)}"
        + (f" --unseen --unseen-epochs {args.unseen_epochs}" if args.unseen else "")
        + (" --trained-dir DIR" if args.unseen and args.trained_dir else "")
        + (f" --name {args.name}" if args.name != NAME else "")
        + f"`, load average at the end {load_average()}; scVI epochs: "
        f"{args.scvi_epochs or 'scvi-tools default'}. scib-metrics `Benchmarker`, raw scores "
        "(not min-max scaled), total = 0.6 bio + 0.4 batch; the PBMC chemistries have no "
        "labels, so only batch correction is scored there. Every embedding of a dataset is "
        "made in this run on the same cells; `integrate` fine-tunes the shipped default "
        "models, which saw these cells (without labels) in pretraining. scGPT read "
        f"{args.scgpt_genes} genes per cell (the official recipe reads 1,200); the epochs "
        "each integration ran are in the table (integrate's defaults: as many as make 800 "
        "optimisation steps, for scGPT at least the tutorial's 15).\n\n"
        + "\n".join(_verdicts(rows))
        + "\n\n"
        + markdown_table(rows, columns)
        + "\n\n## scib-metrics, each metric\n\n"
        + markdown_table(rows, detail)
        + f"\n\n![integration]({args.name}.png)\n\n"
        + "\n".join(f"![scib-metrics table]({t})" for t in tables)
        + "\n"
    )
    write_results(
        args.name,
        # whether models were reused, not where they lie (no machine paths in the results)
        {
            "machine": machine_info(args.threads),
            **vars(args),
            "trained_dir": args.trained_dir is not None,
            "rows": rows,
        },
        markdown,
    )
    _figure(rows, args.name)
    print(markdown)


if __name__ == "__main__":
    main()
