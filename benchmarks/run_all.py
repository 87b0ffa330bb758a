"""Run the whole benchmark suite and write one report.

Each benchmark script runs in its own process (so one failing does not stop the others and peak
memory stays per script), writes ``results/<name>.{json,md}`` (and figures), and this driver then
gathers every ``results/*.md`` into ``results/REPORT.md`` with a header saying which scripts ran,
how long each took and which failed.

    python benchmarks/run_all.py                  # everything, default sizes
    python benchmarks/run_all.py --only perturbation embedding_quality
    python benchmarks/run_all.py --skip scgpt_speed --extra "--threads 2"

The report always covers every benchmark: those not run this time appear with the results of
their last run (their own headers give its date, commit and machine).

Every figure in the report is measured in the same run as its baseline by the script that made
it; the report only puts them side by side.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import shlex
import subprocess
import sys
import time
from pathlib import Path

from _common import RESULTS_DIR, machine_info, markdown_table

HERE = Path(__file__).resolve().parent
# Order: cheap and most-read first. Keys are the scripts' stems without "bench_".
SUITE = {
    "default_embedding": "leave-one-dataset-out: default models' embeddings vs PCA and scVI",
    "default_annotation": "default annotate(reference=...) vs logistic regression",
    "embedding_quality": "zero-shot embeddings vs HVG+PCA and scVI (kNN, scib-metrics)",
    "annotation": "annotation macro-F1 vs logistic regression and kNN-on-PCA",
    "imputation": "imputation vs no imputation, kNN smoothing and diffusion",
    "grn": "GRN AUPRC vs co-expression",
    "perturbation": "perturbation prediction: methods against mean and additive baselines",
    "scgpt_speed": "scGPT embedding speed and memory vs the official path",
    "model_speed": "scBERT / scFoundation / CellPLM speed and memory at published sizes",
    "out_of_core": "embedding throughput and memory from backed files (10k-1M cells)",
    "training": "training throughput, 1 vs 2 DDP processes",
}


def _available() -> dict[str, Path]:
    return {
        name: HERE / f"bench_{name}.py" for name in SUITE if (HERE / f"bench_{name}.py").exists()
    }


def _report(runs: list[dict]) -> str:
    parts = [
        "# scfm_tools benchmark report\n",
        f"Report built by `python benchmarks/run_all.py` at "
        f"{_dt.datetime.now(_dt.UTC).isoformat(timespec='minutes')}; each section below is "
        "the Markdown its script wrote (`benchmarks/results/<name>.md`), baselines measured in "
        "the same run as the models.\n",
        markdown_table(
            runs,
            [
                ("name", "benchmark"),
                ("what", "measures"),
                ("status", "status"),
                ("seconds", "seconds"),
            ],
        ),
    ]
    for run in runs:
        md = RESULTS_DIR / f"{run['name']}.md"
        if md.exists():
            body = md.read_text(encoding="utf-8").strip()
            # Demote the script's own title one level under the report's.
            parts.append("\n#" + body if body.startswith("#") else body)
    return "\n\n".join(parts) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--only", nargs="*", default=None, help="benchmarks to run (names)")
    parser.add_argument("--skip", nargs="*", default=[], help="benchmarks to leave out")
    parser.add_argument("--extra", default="", help="arguments passed to every script")
    parser.add_argument(
        "--report-only", action="store_true", help="rebuild REPORT.md from the existing results"
    )
    args = parser.parse_args()

    scripts = _available()
    unknown = sorted((set(args.only or []) | set(args.skip)) - set(SUITE))
    if unknown:
        parser.error(f"unknown benchmark(s) {unknown}; known: {list(SUITE)}")
    names = [n for n in (args.only or scripts) if n in scripts and n not in args.skip]
    runs = []
    # The report covers the whole suite: what is not run now shows its earlier results.
    for name in scripts:
        run = {"name": name, "what": SUITE[name]}
        if args.report_only or name not in names:
            exists = (RESULTS_DIR / f"{name}.md").exists()
            run["status"] = "results of an earlier run" if exists else "no results yet"
        else:
            started = time.perf_counter()
            print(f"[run_all] {name} ...", file=sys.stderr, flush=True)
            code = subprocess.call(
                [sys.executable, str(scripts[name]), *shlex.split(args.extra)], cwd=HERE
            )
            run["seconds"] = time.perf_counter() - started
            run["status"] = "ok" if code == 0 else f"failed (exit {code})"
        runs.append(run)
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    (RESULTS_DIR / "REPORT.md").write_text(_report(runs), encoding="utf-8")
    info = machine_info()
    print(
        f"[run_all] wrote {RESULTS_DIR.name}/REPORT.md ({len(runs)} benchmarks) on "
        f"{info.get('cpu_model', 'this machine')}",
        file=sys.stderr,
    )
    if any(r["status"].startswith("failed") for r in runs):
        sys.exit(1)


if __name__ == "__main__":
    main()
