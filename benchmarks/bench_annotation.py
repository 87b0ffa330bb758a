"""Cell-type annotation: fine-tuned scBERT against logistic regression and kNN on PCA, same run.

Tasks (labels from ``../shared/data``; cells without a label and cell types with fewer than 10
cells are dropped):

* ``pbmc8k_200genes_labeled.h5ad``: a stratified split by cell (80% train, 20% test);
* ``cellbench_3celllines_celseq2_dropseq.h5ad``: across protocols, train on one batch and test
  on the other (both directions).

Methods, all trained on the same training cells and scored on the same test cells:

* **scBERT** through the public path: a small scBERT is pretrained here (masked-bin objective,
  ``SCBERT.train``) on the *training* cells, exported as an official-layout checkpoint, then
  ``sft.tl.annotate(test, model=ckpt, reference=train, label_key=...)`` fine-tunes the
  official parts (classifier head, final norm, second-to-last block, official class weights)
  and predicts. The model is small (``--dim``/``--depth``) and reads the 2,000 most variable
  genes of the training cells (``--scbert-genes``; all 200 for pbmc8k) so that it trains in
  minutes on a CPU; gene2vec is not available for these genes, so each gene gets a fixed
  random vector in its place (gene identity only, no co-expression prior). Pass ``--model
  PATH`` (e.g. the official ``panglao_pretrain.pth`` with its ``gene_list.txt``) to fine-tune
  other weights.
* **logistic regression** on log-normalised expression (``log1p`` counts per 10,000, all genes;
  scikit-learn, L2, C=1);
* **kNN on PCA**: 50 principal components of the training cells' log-normalised expression
  (2,000 most variable genes, or all when fewer), test cells projected, k=15;
* **scGPT default + kNN / logistic regression**: the embedded ``scgpt-default`` model's cell
  embeddings (``sft.tl.embed_cells``; through ``sft.tl.annotate(method=...)`` when it has
  that option) with the same two classifiers.

Scores: accuracy and macro-F1 on the test cells.

    python benchmarks/bench_annotation.py            # ~5 min on 2 cores
    python benchmarks/bench_annotation.py --quick    # smoke run
    python benchmarks/bench_annotation.py --model panglao_pretrain.pth

Writes benchmarks/results/annotation.{json,md}.
"""

from __future__ import annotations

import argparse
import inspect
import logging
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np

from _common import (
    display_path,
    load_average,
    log,
    machine_info,
    markdown_table,
    set_threads,
    shared_path,
    write_results,
)

NAME = "annotation"
LABEL = "cell_type"
MIN_CELLS = 10
TRAIN_QUIET = {"accelerator": "cpu", "enable_progress_bar": False, "enable_model_summary": False}


# data --------------------------------------------------------------------------------------------
def _labelled(data_dir: Path, name: str):
    import anndata as ad

    adata = ad.read_h5ad(data_dir / name)
    labels = adata.obs[LABEL].astype(str)
    keep = adata.obs[LABEL].notna().to_numpy() & (labels != "NA").to_numpy()
    adata = adata[keep].copy()
    counts = adata.obs[LABEL].value_counts()
    adata = adata[adata.obs[LABEL].isin(counts.index[counts >= MIN_CELLS])].copy()
    adata.obs[LABEL] = adata.obs[LABEL].astype(str).astype("category")
    return adata


def tasks(data_dir: Path, seed: int, quick: bool) -> list[dict[str, Any]]:
    """``[{name, dataset, split, train, test}]`` with AnnData copies of raw counts."""
    from sklearn.model_selection import train_test_split

    out = []
    pbmc = _labelled(data_dir, "pbmc8k_200genes_labeled.h5ad")
    rows = np.arange(pbmc.n_obs)
    if quick:
        rows = np.random.default_rng(seed).choice(rows, 1500, replace=False)
    train, test = train_test_split(
        rows, test_size=0.2, random_state=seed, stratify=pbmc.obs[LABEL].to_numpy()[rows]
    )
    out.append(
        {
            "dataset": "pbmc8k_200genes_labeled.h5ad",
            "split": "by cell, stratified 80/20",
            "train": pbmc[np.sort(train)].copy(),
            "test": pbmc[np.sort(test)].copy(),
        }
    )
    bench = _labelled(data_dir, "cellbench_3celllines_celseq2_dropseq.h5ad")
    batches = sorted(bench.obs["batch"].unique())
    directions = [(batches[0], batches[1])] if quick else [(a, b) for a in batches for b in batches]
    for ref, query in directions:
        if ref == query:
            continue
        out.append(
            {
                "dataset": "cellbench_3celllines_celseq2_dropseq.h5ad",
                "split": f"train {ref}, test {query}",
                "train": bench[(bench.obs["batch"] == ref).to_numpy()].copy(),
                "test": bench[(bench.obs["batch"] == query).to_numpy()].copy(),
            }
        )
    return out


def lognorm(adata) -> np.ndarray:
    """Dense-free ``log1p`` counts per 10,000 (CSR)."""
    from scipy import sparse

    X = sparse.csr_matrix(adata.X, dtype=np.float64)
    totals = np.asarray(X.sum(axis=1)).ravel()
    scale = np.divide(1e4, totals, out=np.zeros_like(totals), where=totals > 0)
    X = sparse.diags(scale) @ X
    X.data = np.log1p(X.data)
    return X.tocsr()


# scores ------------------------------------------------------------------------------------------
def score(truth, pred) -> dict[str, float]:
    from sklearn.metrics import accuracy_score, f1_score

    truth = np.asarray(truth).astype(str)
    pred = np.asarray(pred).astype(str)
    return {
        "accuracy": float(accuracy_score(truth, pred)),
        "macro_f1": float(f1_score(truth, pred, average="macro", labels=np.unique(truth))),
    }


# baselines ---------------------------------------------------------------------------------------
def logreg(X_train, y_train, X_test, seed: int):
    from sklearn.linear_model import LogisticRegression

    clf = LogisticRegression(max_iter=2000, C=1.0, random_state=seed)
    return clf.fit(X_train, y_train).predict(X_test)


def knn_pca(train, test, X_train, X_test, y_train, *, n_pcs: int, k: int, seed: int):
    """kNN (k) on the PCA of the training cells (HVGs), test cells projected."""
    import scanpy as sc
    from sklearn.decomposition import TruncatedSVD
    from sklearn.neighbors import KNeighborsClassifier

    hv = train.copy()
    hv.X = X_train
    if hv.n_vars > 2000:
        sc.pp.highly_variable_genes(hv, n_top_genes=2000)
        genes = hv.var["highly_variable"].to_numpy()
    else:
        genes = np.ones(hv.n_vars, dtype=bool)
    A = X_train[:, genes].toarray()
    B = X_test[:, genes].toarray()
    mean = A.mean(axis=0)
    n_pcs = min(n_pcs, A.shape[0] - 1, A.shape[1] - 1)
    svd = TruncatedSVD(n_components=n_pcs, algorithm="arpack", random_state=seed).fit(A - mean)
    pcs_train, pcs_test = svd.transform(A - mean), svd.transform(B - mean)
    clf = KNeighborsClassifier(n_neighbors=k).fit(pcs_train, y_train)
    return clf.predict(pcs_test)


# scGPT default embeddings ------------------------------------------------------------------------
def scgpt_default(train, test, y_train, *, k: int, seed: int) -> dict[str, tuple]:
    """kNN and logistic regression on the embedded default model's cell embeddings."""
    import scfm_tools as sft

    out: dict[str, tuple] = {}
    params = inspect.signature(sft.tl.annotate).parameters
    if "method" in params:
        for method in ("knn", "logreg"):
            query = test.copy()
            started = time.perf_counter()
            extra = {"n_neighbors": k} if method == "knn" and "n_neighbors" in params else {}
            sft.tl.annotate(query, reference=train, label_key=LABEL, method=method, **extra)
            label_keys = [c for c in query.obs.columns if c.endswith("_label")]
            pred = query.obs[label_keys[0]].astype(str).to_numpy()
            out[f"scgpt-default + {method} (sft.tl.annotate)"] = (
                pred,
                time.perf_counter() - started,
            )
        return out
    started = time.perf_counter()
    ref, query = train.copy(), test.copy()
    sft.tl.embed_cells(ref)
    sft.tl.embed_cells(query)
    (key,) = [k_ for k_ in query.obsm if k_.startswith("X_")]
    embed_s = time.perf_counter() - started
    from sklearn.linear_model import LogisticRegression
    from sklearn.neighbors import KNeighborsClassifier

    started = time.perf_counter()
    knn = KNeighborsClassifier(n_neighbors=k, metric="cosine").fit(ref.obsm[key], y_train)
    out["scgpt-default embedding + kNN"] = (
        knn.predict(query.obsm[key]),
        embed_s + time.perf_counter() - started,
    )
    started = time.perf_counter()
    lr = LogisticRegression(max_iter=2000, random_state=seed).fit(ref.obsm[key], y_train)
    out["scgpt-default embedding + logreg"] = (
        lr.predict(query.obsm[key]),
        embed_s + time.perf_counter() - started,
    )
    return out


# scBERT ------------------------------------------------------------------------------------------
def scbert_genes(train, X_train, n_top: int) -> np.ndarray:
    """The small scBERT's gene list: the ``n_top`` most variable training genes (all if fewer)."""
    import scanpy as sc

    if n_top <= 0 or train.n_vars <= n_top:
        return np.ones(train.n_vars, dtype=bool)
    hv = train.copy()
    hv.X = X_train
    sc.pp.highly_variable_genes(hv, n_top_genes=n_top)
    return hv.var["highly_variable"].to_numpy()


def pretrain_scbert(train, *, arch: dict, epochs: int, seed: int, folder: Path) -> dict:
    """Masked-bin pretraining of a small scBERT on the training cells; official-layout export."""
    import torch

    from scfm_tools.models import SCBERT

    cells = train.copy()
    cells.obs = cells.obs[[]]
    SCBERT.setup_anndata(cells)
    # gene2vec is not available for these genes: fixed random gene vectors give gene identity.
    g2v = np.random.default_rng(seed).normal(size=(cells.n_vars, arch["dim"]))
    torch.manual_seed(seed)
    model = SCBERT(cells, gene2vec=g2v, **arch)
    started = time.perf_counter()
    model.train(
        max_epochs=epochs,
        batch_size=32,
        train_size=1.0,
        plan_kwargs={"lr": 2e-3, "random_state": seed},
        **TRAIN_QUIET,
    )
    seconds = time.perf_counter() - started
    loss = np.asarray(model.history["train_loss"]).ravel().astype(float)
    path = model.export_checkpoint(folder, overwrite=True)
    return {
        "path": path,
        "pretrain_seconds": seconds,
        "pretrain_epochs": epochs,
        "pretrain_loss_first": float(loss[0]),
        "pretrain_loss_last": float(loss[-1]),
    }


def annotate_scbert(train, test, ckpt: Path, *, epochs: int, lr: float, seed: int) -> tuple:
    import scfm_tools as sft

    query = test.copy()
    kwargs: dict[str, Any] = {}
    if "method" in inspect.signature(sft.tl.annotate).parameters:
        kwargs["method"] = "finetune"
    started = time.perf_counter()
    sft.tl.annotate(
        query,
        model=ckpt,
        reference=train,
        label_key=LABEL,
        max_epochs=epochs,
        batch_size=32,
        random_state=seed,
        train_kwargs={"plan_kwargs": {"lr": lr}, "train_size": 1.0, **TRAIN_QUIET},
        **kwargs,
    )
    seconds = time.perf_counter() - started
    params = query.uns["scbert"]["params"]
    return query.obs["scbert_label"].astype(str).to_numpy(), seconds, params


# report ------------------------------------------------------------------------------------------
def _markdown(payload: dict[str, Any]) -> str:
    st, m = payload["settings"], payload["machine"]
    columns = [
        ("dataset", "dataset"),
        ("split", "split"),
        ("n_train", "train cells"),
        ("n_test", "test cells"),
        ("n_classes", "types"),
        ("method", "method"),
        ("accuracy", "accuracy"),
        ("macro_f1", "macro-F1"),
        ("seconds", "train + predict s"),
    ]
    lines = [
        "# Cell-type annotation against baselines",
        "",
        f"`{payload['command']}` on {m['cpu_model']}, torch {m['torch']}, "
        f"{st['threads']} torch threads, commit {m['git_commit']}, {st['wall_s']:.0f} s in all; "
        f"load average {m['load_average']} at the start, {st['load_average_end']} at the end.",
        "",
        f"scBERT: {st['scbert_model']}. Fine-tuning through `sft.tl.annotate(..., reference=, "
        f"label_key=)` ({st['finetune_epochs']} epochs, lr {st['finetune_lr']}, official "
        "trainable parts and class weights). Logistic regression: scikit-learn L2 (C=1) on "
        "`log1p` counts per 10,000 of all genes. kNN on PCA: 50 PCs of the training cells "
        "(2,000 HVGs where there are more genes), test cells projected, k=15. scGPT default: "
        "the embedded `scgpt-default` model's embeddings, labels transferred by "
        '`sft.tl.annotate(method="knn")` (k=15, cosine, 1/distance votes) and '
        '`method="logreg"` (logistic regression on standardised embeddings). '
        "Every method is trained on the same training cells and scored on the same "
        "test cells in this run.",
        "",
        markdown_table(payload["rows"], columns),
    ]
    if payload.get("scbert_training"):
        lines += [
            "",
            "## scBERT pretraining (masked bins, on each task's training cells)",
            "",
            markdown_table(
                payload["scbert_training"],
                [
                    ("dataset", "dataset"),
                    ("split", "split"),
                    ("pretrain_epochs", "epochs"),
                    ("pretrain_seconds", "s"),
                    ("pretrain_loss_first", "first loss"),
                    ("pretrain_loss_last", "last loss"),
                    ("final_train_loss", "fine-tuning last loss"),
                ],
            ),
        ]
    if payload.get("notes"):
        lines += ["", "## Notes", ""] + [f"- {n}" for n in payload["notes"]]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", help="scBERT checkpoint to fine-tune instead of pretraining")
    parser.add_argument("--dim", type=int, default=32, help="scBERT width (published 200)")
    parser.add_argument("--depth", type=int, default=2, help="scBERT blocks (published 6)")
    parser.add_argument("--heads", type=int, default=4, help="scBERT heads (published 10)")
    parser.add_argument("--dim-head", type=int, default=16, help="head width (published 64)")
    parser.add_argument(
        "--scbert-genes",
        type=int,
        default=2000,
        help="scBERT trained here reads this many HVGs of the training cells (0: all genes)",
    )
    parser.add_argument("--pretrain-epochs", type=int, default=3)
    parser.add_argument("--finetune-epochs", type=int, default=10)
    parser.add_argument("--finetune-lr", type=float, default=1e-3)
    parser.add_argument("--k", type=int, default=15)
    parser.add_argument("--n-pcs", type=int, default=50)
    parser.add_argument("--skip-scbert", action="store_true")
    parser.add_argument("--skip-scgpt", action="store_true")
    parser.add_argument("--quick", action="store_true", help="smoke run")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default=NAME)
    args = parser.parse_args(argv)
    if args.quick:
        args.pretrain_epochs, args.finetune_epochs = 1, 2

    set_threads(args.threads)
    for name in ("lightning", "lightning.pytorch", "scvi"):
        logging.getLogger(name).setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", message=".*does not have many workers.*")
    import scfm_tools as sft

    sft.settings.n_threads = args.threads
    machine = machine_info(args.threads)
    wall = time.perf_counter()
    arch = {"dim": args.dim, "depth": args.depth, "heads": args.heads, "dim_head": args.dim_head}
    rows: list[dict[str, Any]] = []
    scbert_training: list[dict[str, Any]] = []
    notes: list[str] = []
    for task in tasks(shared_path("SFT_DATA", "../shared/data"), args.seed, args.quick):
        train, test = task["train"], task["test"]
        y_train, y_test = train.obs[LABEL].astype(str).to_numpy(), test.obs[LABEL].astype(str)
        base = {
            "dataset": task["dataset"],
            "split": task["split"],
            "n_train": train.n_obs,
            "n_test": test.n_obs,
            "n_classes": len(np.unique(y_train)),
            "n_genes": train.n_vars,
        }
        log(f"{task['dataset']} ({task['split']}): {train.n_obs} train, {test.n_obs} test")
        preds: dict[str, tuple] = {}
        X_train, X_test = lognorm(train), lognorm(test)
        started = time.perf_counter()
        preds["logistic regression (baseline)"] = (
            logreg(X_train, y_train, X_test, args.seed),
            time.perf_counter() - started,
        )
        started = time.perf_counter()
        preds[f"kNN on PCA, {args.n_pcs} PCs, k={args.k} (baseline)"] = (
            knn_pca(
                train, test, X_train, X_test, y_train, n_pcs=args.n_pcs, k=args.k, seed=args.seed
            ),
            time.perf_counter() - started,
        )
        if not args.skip_scgpt:
            preds.update(scgpt_default(train, test, y_train, k=args.k, seed=args.seed))
        if not args.skip_scbert:
            with tempfile.TemporaryDirectory(prefix="bench_scbert_") as tmp:
                if args.model:
                    ckpt, info = Path(args.model), {"pretrain_seconds": 0.0}
                else:
                    log(f"  pretraining scBERT {arch} ({args.pretrain_epochs} epochs)")
                    genes = scbert_genes(train, X_train, args.scbert_genes)
                    info = pretrain_scbert(
                        train[:, genes].copy(),
                        arch=arch,
                        epochs=args.pretrain_epochs,
                        seed=args.seed,
                        folder=Path(tmp),
                    )
                    ckpt = info.pop("path")
                log(f"  fine-tuning scBERT ({args.finetune_epochs} epochs)")
                pred, seconds, params = annotate_scbert(
                    train,
                    test,
                    ckpt,
                    epochs=args.finetune_epochs,
                    lr=args.finetune_lr,
                    seed=args.seed,
                )
            preds["scBERT fine-tuned (sft.tl.annotate)"] = (
                pred,
                seconds + info["pretrain_seconds"],
            )
            scbert_training.append(
                {
                    "dataset": task["dataset"],
                    "split": task["split"],
                    **info,
                    "final_train_loss": params.get("final_train_loss"),
                }
            )
        for method, (pred, seconds) in preds.items():
            row = {**base, "method": method, **score(y_test, pred), "seconds": seconds}
            rows.append(row)
            log(f"  {method}: accuracy {row['accuracy']:.3f}, macro-F1 {row['macro_f1']:.3f}")

    if args.model:
        scbert_model = f"`{display_path(args.model)}` (given with --model)"
    else:
        scbert_model = (
            "a small model pretrained in this run on each task's training cells (dim "
            f"{args.dim}, {args.depth} blocks, {args.heads} heads of {args.dim_head}, reading "
            f"the {args.scbert_genes} most variable genes of the training cells where there are "
            "more; the "
            "published model is 200 wide, 6 blocks, 10 heads of 64, pretrained on PanglaoDB), "
            "random gene vectors in place of gene2vec"
        )
    for task_rows in _by_task(rows):
        lr = next(r for r in task_rows if r["method"].startswith("logistic"))
        for r in task_rows:
            if "baseline" not in r["method"] and r["method"] != lr["method"]:
                gap = r["macro_f1"] - lr["macro_f1"]
                notes.append(
                    f"{r['dataset']} ({r['split']}): {r['method']} macro-F1 {r['macro_f1']:.3f}, "
                    f"{gap:+.3f} against logistic regression."
                )
    payload = {
        "command": " ".join(["python benchmarks/bench_annotation.py", *sys.argv[1:]]).strip(),
        "machine": machine,
        "settings": {
            "scbert_model": scbert_model,
            "scbert_architecture": None if args.model else arch,
            "pretrain_epochs": args.pretrain_epochs,
            "finetune_epochs": args.finetune_epochs,
            "finetune_lr": args.finetune_lr,
            "k": args.k,
            "n_pcs": args.n_pcs,
            "min_cells_per_type": MIN_CELLS,
            "seed": args.seed,
            "threads": args.threads,
            "wall_s": time.perf_counter() - wall,
            "load_average_end": load_average(),
        },
        "rows": rows,
        "scbert_training": scbert_training,
        "notes": notes,
    }
    json_path, md_path = write_results(args.out, payload, _markdown(payload))
    print(_markdown(payload))
    print(f"wrote {display_path(json_path)} and {display_path(md_path)}")
    return 0


def _by_task(rows: list[dict[str, Any]]) -> list[list[dict[str, Any]]]:
    groups: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for r in rows:
        groups.setdefault((r["dataset"], r["split"]), []).append(r)
    return list(groups.values())


if __name__ == "__main__":
    raise SystemExit(main())
