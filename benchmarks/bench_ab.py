"""A/B speed of the user entry points: the package at two commits, on the same real cells.

Each job times one ``sft.tl`` call as a user makes it (weights loading included) in a fresh
process, with the package imported from one commit or the other (``git archive`` of each into a
scratch folder, nothing installed); the two commits alternate round after round, so both see
the machine's same states. The outputs of the two commits are compared too (max abs
difference): the families whose inference draws nothing random must agree to float rounding.

Run ``python benchmarks/bench_ab.py --before <commit>`` (``--after`` defaults to the working
tree) on a quiet machine: results go to ``results/ab_speed.{json,md}``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import tarfile
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from _common import (
    REPO_ROOT,
    load_average,
    log,
    machine_info,
    markdown_table,
    run_worker,
    shared_path,
    worker_reply,
    write_results,
)

CELLBENCH = "cellbench_3celllines_celseq2_dropseq.h5ad"
PBMC = "pbmc8k_200genes_labeled.h5ad"

# job -> what it runs (the same call at both commits; options both commits take)
JOBS = {
    "embed_cells scGPT (default model, 450 CellBench cells)": "scgpt",
    "embed_genes scGPT context (450 CellBench cells)": "scgpt_genes",
    "embed_cells scBERT (dim 32, 11.5k genes, 60 cells)": "scbert",
    "embed_cells scFoundation (fixture checkpoint, 400 PBMCs)": "scfoundation",
    "impute scFoundation (fixture checkpoint, 200 PBMCs)": "scfoundation_impute",
    "embed_cells CellPLM (fixture checkpoint, 3,000 cells)": "cellplm",
}


# worker ------------------------------------------------------------------------------------------
def _data(name: str):
    import anndata as ad

    return ad.read_h5ad(shared_path("SFT_DATA", "../shared/data") / name)


def _plm_cells(fixtures: Path, copies: int):
    import anndata as ad
    import pandas as pd
    from scipy import sparse

    arrays = dict(np.load(fixtures / "cellplm" / "fixture_io.npz"))
    counts = sparse.vstack([sparse.csr_matrix(arrays["counts"])] * copies).tocsr()
    batch = np.concatenate([arrays["obs_batch"].astype(str)] * copies)
    return ad.AnnData(
        counts,
        obs=pd.DataFrame({"batch": batch}, index=[f"c{i}" for i in range(counts.shape[0])]),
        var=pd.DataFrame(index=[str(g) for g in arrays["var_names"]]),
    )


def _worker(spec: dict[str, Any]) -> None:
    import torch

    import scfm_tools as sft

    torch.set_num_threads(spec["threads"])
    fixtures = shared_path("SFT_FIXTURES", "../shared/fixtures")
    job, out = spec["job"], Path(spec["out"])
    started = time.perf_counter()
    if job == "scgpt":
        adata = _data(CELLBENCH)
        sft.tl.embed_cells(adata, "scgpt-default")
        result = adata.obsm["X_scgpt"]
    elif job == "scgpt_genes":
        adata = _data(CELLBENCH)
        sft.tl.embed_genes(adata, mode="context")
        result = adata.varm["X_scgpt_genes"]
    elif job == "scbert":
        adata = _data(CELLBENCH)[:60].copy()
        sft.tl.embed_cells(adata, spec["scbert_ckpt"])
        result = adata.obsm["X_scbert"]
    elif job == "scfoundation":
        adata = _data(PBMC)[:400].copy()
        sft.tl.embed_cells(adata, str(next((fixtures / "scfoundation").glob("*.ckpt"))))
        result = adata.obsm["X_scfoundation"]
    elif job == "scfoundation_impute":
        adata = _data(PBMC)[:200].copy()
        sft.tl.impute(adata, str(next((fixtures / "scfoundation").glob("*.ckpt"))))
        result = adata.layers["scfoundation_imputed"]
    elif job == "cellplm":
        adata = _plm_cells(fixtures, spec["plm_copies"])
        sft.tl.embed_cells(adata, str(fixtures / "cellplm"), batch_key="batch")
        result = adata.obsm["X_cellplm"]
    else:
        raise ValueError(f"unknown job {job!r}")
    seconds = time.perf_counter() - started
    np.save(out, np.asarray(result, dtype=np.float32))
    worker_reply({"seconds": seconds, "n_obs": int(adata.n_obs)})


# parent ------------------------------------------------------------------------------------------
def _export(rev: str, folder: Path) -> Path:
    """The package's sources at ``rev`` in ``folder`` (``"worktree"``: this checkout)."""
    if rev == "worktree":
        return REPO_ROOT
    folder.mkdir(parents=True)
    archive = folder / "src.tar"
    subprocess.run(
        ["git", "archive", "--format=tar", "-o", str(archive), rev, "src"],
        cwd=REPO_ROOT,
        check=True,
    )
    with tarfile.open(archive) as tar:
        tar.extractall(folder, filter="data")
    return folder


def _scbert_checkpoint(folder: Path) -> Path:
    """A small random scBERT in the official layout on CellBench's genes (both commits read it)."""
    import anndata as ad
    import pandas as pd
    import torch

    from scfm_tools.models import SCBERT

    cells = _data(CELLBENCH)
    adata = ad.AnnData(cells.X[:4].copy(), var=pd.DataFrame(index=cells.var_names))
    SCBERT.setup_anndata(adata)
    torch.manual_seed(0)
    g2v = np.random.default_rng(0).normal(size=(adata.n_vars, 32)).astype(np.float32)
    model = SCBERT(adata, gene2vec=g2v, dim=32, depth=2, heads=2, dim_head=16)
    return model.export_checkpoint(folder)


def _revision(rev: str) -> str:
    if rev == "worktree":
        return "working tree"
    out = subprocess.run(
        ["git", "rev-parse", "--short", rev], cwd=REPO_ROOT, capture_output=True, text=True
    )
    return out.stdout.strip() or rev


def main(argv: list[str] | None = None) -> int:
    """Run the A/B comparison (or, with ``--worker``, one job)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--before", required=False, default="HEAD~1", help="baseline commit")
    parser.add_argument("--after", default="worktree", help="commit, or 'worktree' (default)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument(
        "--plm-copies", type=int, default=300, help="copies of the 10 CellPLM cells"
    )
    parser.add_argument("--jobs", nargs="*", default=None, help="job keys (default: all)")
    parser.add_argument("--out", default="ab_speed")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        _worker(json.loads(args.worker))
        return 0

    jobs = {k: v for k, v in JOBS.items() if args.jobs is None or v in args.jobs}
    with tempfile.TemporaryDirectory(prefix="sft_ab_") as scratch:
        scratch = Path(scratch)
        trees = {
            "before": _export(args.before, scratch / "before"),
            "after": _export(args.after, scratch / "after"),
        }
        ckpt = _scbert_checkpoint(scratch / "scbert")
        times: dict[str, dict[str, list[float]]] = {j: {"before": [], "after": []} for j in jobs}
        diffs: dict[str, float] = {}
        loads = []
        for r in range(args.rounds):
            for label, job in jobs.items():
                # alternate which commit goes first, so neither always meets the warmer state
                order = ("before", "after") if r % 2 == 0 else ("after", "before")
                outs = {}
                for side in order:
                    spec = {
                        "job": job,
                        "threads": args.threads,
                        "out": str(scratch / f"{job}_{side}.npy"),
                        "scbert_ckpt": str(ckpt),
                        "plm_copies": args.plm_copies,
                    }
                    reply = run_worker(
                        __file__,
                        spec,
                        threads=args.threads,
                        echo=None,
                        pythonpath=trees[side] / "src",
                    )
                    times[label][side].append(reply["seconds"])
                    outs[side] = spec["out"]
                    log(f"round {r + 1} {side:6s} {label}: {reply['seconds']:.2f} s")
                a, b = (np.load(outs[s]) for s in ("before", "after"))
                both = np.isfinite(a) & np.isfinite(b)
                diffs[label] = float(np.abs(a[both] - b[both]).max()) if both.any() else 0.0
                loads.append(load_average())
    rows = []
    for label, sides in times.items():
        before, after = (statistics.median(sides[s]) for s in ("before", "after"))
        rows.append(
            {
                "job": label,
                "before_s": round(before, 3),
                "after_s": round(after, 3),
                "after_over_before": round(after / before, 3),
                "spread_before": round(max(sides["before"]) / min(sides["before"]), 3),
                "spread_after": round(max(sides["after"]) / min(sides["after"]), 3),
                "max_abs_diff": diffs[label],
            }
        )
    payload = {
        "before": _revision(args.before),
        "after": _revision(args.after),
        "rounds": args.rounds,
        "threads": args.threads,
        "times_s": times,
        "rows": rows,
        "load_averages": loads,
        "machine": machine_info(args.threads),
    }
    columns = [
        ("job", "job (user call, weights loading included)"),
        ("before_s", "before s (median)"),
        ("after_s", "after s (median)"),
        ("after_over_before", "after / before"),
        ("spread_before", "max/min before"),
        ("spread_after", "max/min after"),
        ("max_abs_diff", "max abs diff of outputs"),
    ]
    md = (
        f"# A/B speed of the user entry points: {payload['before']} -> {payload['after']}\n\n"
        f"{args.rounds} alternating rounds, fresh process per call, {args.threads} threads; "
        f"load averages during the run: {loads}.\n\n" + markdown_table(rows, columns)
    )
    write_results(args.out, payload, md)
    print(md)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
