"""OpenMP waiting: libgomp's default spin, sleeping at once, and scfm_tools' short spin.

``import scfm_tools`` sets ``GOMP_SPINCOUNT=10000`` when neither the user nor an earlier torch
import has fixed how OpenMP workers wait. This measures what that choice costs on a quiet
machine and what it saves on a shared one: ``sft.tl.embed_cells`` with each family's shipped
default (or ``--model FAMILY=PATH``) on the same real cells, in fresh processes that alternate
the settings, first with the machine as it is, then beside ``--load`` busy processes
(pure-Python loops, one core each), as another user's job would be.

* ``default``: torch imported before scfm_tools, so libgomp keeps its own default (spin up to
  300,000 turns at each barrier, then sleep);
* ``passive``: the same with ``OMP_WAIT_POLICY=PASSIVE`` (sleep at once);
* ``scfm_tools``: scfm_tools imported first, which sets the short spin.

Times run from the h5ad in memory to the embedding (imports, scvi-tools included, before the
clock); medians over ``--rounds``.

    python benchmarks/bench_thread_policy.py [--rounds 3] [--load 2] [--threads 2] \
        [--model scbert=PATH --cells scbert=2]

Writes ``benchmarks/results/thread_policy.{json,md}``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from _common import (
    load_average,
    log,
    machine_info,
    markdown_table,
    run_worker,
    shared_path,
    worker_reply,
    write_results,
)

NAME = "thread_policy"
CELLBENCH = "cellbench_3celllines_celseq2_dropseq.h5ad"
# family -> (shipped default, cells, embed_cells options)
WORKLOADS = {
    "scbert": ("scbert-default", 32, {}),
    "scgpt": ("scgpt-default", 128, {}),
    "scfoundation": ("scfoundation-default", 16, {}),
    "cellplm": ("cellplm-default", 450, {"batch_key": "batch"}),
}
POLICIES = ("default", "passive", "scfm_tools")


def _worker(spec: dict[str, Any]) -> None:
    if spec["policy"] != "scfm_tools":
        import torch  # noqa: F401  (first: scfm_tools then leaves OpenMP's waiting alone)
    import anndata as ad

    import scfm_tools as sft

    # scvi-tools and Lightning load with the model classes, before the clock.
    import scfm_tools.models

    sft.settings.n_threads = spec["threads"]
    _, _, options = WORKLOADS[spec["family"]]
    model, n_cells = spec["model"], spec["cells"]
    adata = ad.read_h5ad(spec["input"])
    adata = adata[np.random.default_rng(0).permutation(adata.n_obs)[:n_cells]].copy()
    started = time.perf_counter()
    sft.tl.embed_cells(adata, model=model, device="cpu", **options)
    worker_reply(
        {
            "seconds": time.perf_counter() - started,
            "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"),
            "gomp_spincount": os.environ.get("GOMP_SPINCOUNT"),
            "n_obs": int(adata.n_obs),
        }
    )


def _busy(n: int) -> list[subprocess.Popen]:
    return [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(max(n, 0))]


def _measure(args, load: int, data: str) -> list[dict[str, Any]]:
    procs = _busy(load)
    try:
        time.sleep(5 if procs else 0)  # let the busy loops take their cores
        runs = []
        for r in range(args.rounds):
            for family in args.families:
                # alternate which policy goes first, round by round
                for policy in POLICIES if r % 2 == 0 else POLICIES[::-1]:
                    spec = {
                        "family": family,
                        "policy": policy,
                        "input": data,
                        "threads": args.threads,
                        "model": args.model.get(family, WORKLOADS[family][0]),
                        "cells": args.cells.get(family, WORKLOADS[family][1]),
                    }
                    if policy == "passive":
                        os.environ["OMP_WAIT_POLICY"] = "PASSIVE"
                    try:
                        reply = run_worker(__file__, spec, threads=args.threads, echo=None)
                    finally:
                        os.environ.pop("OMP_WAIT_POLICY", None)
                    reply.update(family=family, policy=policy, load=load, round=r)
                    reply.update(model=spec["model"], cells=spec["cells"])
                    reply["load_1min"] = (load_average() or [None])[0]
                    log(f"load {load}, {family}, {policy}: {reply['seconds']:.2f} s")
                    runs.append(reply)
        return runs
    finally:
        for p in procs:
            p.kill()
            p.wait()


def _rows(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    rows = []
    for load in dict.fromkeys(r["load"] for r in runs):
        for family in dict.fromkeys(r["family"] for r in runs):
            med = {
                p: float(
                    np.median(
                        [
                            r["seconds"]
                            for r in runs
                            if (r["load"], r["family"], r["policy"]) == (load, family, p)
                        ]
                    )
                )
                for p in POLICIES
            }
            mine = [r for r in runs if r["load"] == load and r["family"] == family]
            loads = [r["load_1min"] for r in mine]
            rows.append(
                {
                    "background": f"{load} busy process(es)" if load else "none",
                    "family": family,
                    "model": _shown(mine[0]["model"]),
                    "cells": mine[0]["cells"],
                    "default_s": med["default"],
                    "passive_s": med["passive"],
                    "scfm_tools_s": med["scfm_tools"],
                    "speedup": med["default"] / med["scfm_tools"],
                    "load_1min": f"{min(loads):.1f}-{max(loads):.1f}",
                }
            )
    return rows


def _shown(model: str) -> str:
    """A registered name as it is, a checkpoint path by its file name (no machine folders)."""
    return Path(model).name if Path(model).exists() else model


def _command(args) -> str:
    """The command line, with model paths shown without this machine's folders."""
    parts = [f"--rounds {args.rounds} --load {args.load} --threads {args.threads}"]
    if args.model:
        parts.append("--model " + " ".join(f"{k}={_shown(v)}" for k, v in args.model.items()))
    if args.cells:
        parts.append("--cells " + " ".join(f"{k}={v}" for k, v in args.cells.items()))
    return "python benchmarks/bench_thread_policy.py " + " ".join(parts)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--families", nargs="+", choices=list(WORKLOADS), default=list(WORKLOADS))
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--load", type=int, default=2, help="busy processes in the loaded phase")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--model", nargs="*", default=[], metavar="FAMILY=PATH")
    parser.add_argument("--cells", nargs="*", default=[], metavar="FAMILY=N")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        _worker(json.loads(args.worker))
        return
    args.model = dict(item.split("=", 1) for item in args.model)
    args.cells = {k: int(v) for k, v in (item.split("=", 1) for item in args.cells)}
    # The children choose how to wait themselves (see the module notes).
    for var in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT"):
        os.environ.pop(var, None)
    data = str(shared_path("SFT_DATA", "../shared/data") / CELLBENCH)
    started_load = load_average()
    runs = _measure(args, 0, data) + _measure(args, args.load, data)
    rows = _rows(runs)
    columns = [
        ("background", "background load"),
        ("family", "family"),
        ("model", "model"),
        ("cells", "cells"),
        ("default_s", "libgomp default s"),
        ("passive_s", "PASSIVE s"),
        ("scfm_tools_s", "scfm_tools (spin 10,000) s"),
        ("speedup", "default / scfm_tools"),
        ("load_1min", "load (1 min)"),
    ]
    markdown = (
        "# OpenMP waiting: libgomp's default, PASSIVE and scfm_tools' short spin\n\n"
        f"`{_command(args)}`; "
        f"{args.threads} torch threads, `sft.tl.embed_cells` on CellBench cells (seeded "
        "subset), fresh process per run, settings alternating, medians over rounds. Load "
        f"average before the run: {started_load}. Background: pure-Python busy loops started "
        "beside the runs. `default / scfm_tools` above 1: the package's setting is faster.\n\n"
        + markdown_table(rows, columns)
        + "\n"
    )
    write_results(
        NAME,
        {
            "machine": machine_info(args.threads),
            "command": _command(args),
            "rows": rows,
            "runs": [{**r, "model": _shown(r["model"])} for r in runs],
        },
        markdown,
    )
    print(markdown)


if __name__ == "__main__":
    main()
