"""Out-of-core cell embedding: throughput and peak memory of ``sft.tl.embed_cells`` on backed files.

Cells: the 2,860 real full-transcriptome PBMCs of ``pbmc_10x_3chemistries_unlabeled.h5ad``
(11,221 genes, raw counts), replicated in dataset order into an ``.h5ad`` file on disk of the
size asked for (10k, 100k ... cells; CSR, uncompressed). The file is written 10,000 cells at a
time (anndata's ``write_elem`` for the first block, ``sparse_dataset(...).append`` after), so
even the 1M-cell file is never held in memory.

Each size runs in a fresh process pinned to ``--threads`` torch threads: it loads the embedded
model ``scgpt-default`` and warms it up on 64 cells, opens the file with
``anndata.read_h5ad(path, backed="r")``, notes its RSS, then times
``sft.tl.embed_cells(adata, "scgpt-default", device="cpu")`` (input checks included) while a
thread samples the RSS every 20 ms (``/proc/self/statm``). Reported: cells/s (wall clock) and
CPU seconds, the RSS before, the sampled peak and their difference ("growth"), and the growth
beyond the embedding matrix the call returns (``n_cells x 64`` float32, which necessarily grows
with the cells).
Memory is flat when that remainder does not grow with the number of cells: the check is that
it stays within ``--flat-mib`` (64 MiB) of the smallest size's; the peak RSS must also stay
under a fixed bound at every size (``--peak-gib``, 4 GiB). Time is linear in the cells when the
CPU time per cell of the largest size stays within ``--linear-tolerance`` (1.25x) of the
smallest size's (CPU time, since wall clock follows the machine's load). The smallest size is
also run with the file loaded in memory, for contrast, and its first 2,860 cells (the source
file in order) are checked against an in-memory embedding of the source.

Deep cells: the 450 real CellBench cells of ``cellbench_3celllines_celseq2_dropseq.h5ad``
(11,533 genes, ~5,900 non-zero per cell, five times the PBMCs'), replicated the same way to
``--deep-sizes`` (10k and 100k cells) and embedded backed the same way. A 10,000-cell chunk of
them is ~450 MiB of CSR, so any copy of a chunk, or anything kept per cell, shows; the check
is that the peak RSS at the largest deep size stays under ``--deep-ratio`` (1.3x) the peak at
the smallest. Their first 450 cells are checked against the source embedded in memory.

Run ``python benchmarks/bench_out_of_core.py`` (10k and 100k cells of both, about 15 minutes
on 2 idle cores), ``--sizes 10000 100000 1000000`` for the 1M-cell run (about 12 GB of disk in
``--workdir`` and ~22 min more on 2 idle cores). Results go to
``benchmarks/results/out_of_core.{json,md}``.
"""

from __future__ import annotations

import argparse
import gc
import json
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

from _common import (
    cpu_seconds,
    current_rss_mib,
    display_path,
    load_average,
    log,
    machine_info,
    markdown_table,
    peak_rss_mib,
    run_worker,
    set_threads,
    shared_path,
    worker_reply,
    write_replicated_h5ad,
    write_results,
)

NAME = "out_of_core"
MODEL = "scgpt-default"  # the embedded scGPT, zero-shot: streamed chunk by chunk
DATA_FILE = "pbmc_10x_3chemistries_unlabeled.h5ad"
DEEP_FILE = "cellbench_3celllines_celseq2_dropseq.h5ad"
WRITE_BLOCK = 10_000
SAMPLE_EVERY_S = 0.02


# the data ----------------------------------------------------------------------------------------
# worker ------------------------------------------------------------------------------------------
class _RssSampler:
    """Highest RSS seen by a background thread while the block runs."""

    def __init__(self) -> None:
        self.peak = current_rss_mib()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, current_rss_mib())
            self._stop.wait(SAMPLE_EVERY_S)

    def __enter__(self) -> _RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, current_rss_mib())


def job_embed(spec: dict[str, Any]) -> dict[str, Any]:
    """Embed one file (backed or loaded) in this fresh process; time and memory."""
    import anndata as ad

    import scfm_tools as sft
    from scfm_tools._anndata import iter_chunks

    set_threads(spec["threads"])
    source = ad.read_h5ad(spec["source"])
    warm = source[:64].copy()
    sft.tl.embed_cells(warm, MODEL, device="cpu", batch_size=spec["batch_size"])  # warm-up
    del warm
    backed = spec["mode"] == "backed"
    adata = ad.read_h5ad(spec["path"], backed="r" if backed else None)
    gc.collect()
    rss_before = current_rss_mib()
    cpu0, wall0 = cpu_seconds(), time.perf_counter()
    with _RssSampler() as sampler:
        sft.tl.embed_cells(
            adata,
            MODEL,
            device="cpu",
            batch_size=spec["batch_size"],
            chunk_size=spec["chunk_size"],
        )
    wall, cpu = time.perf_counter() - wall0, cpu_seconds() - cpu0
    emb = adata.obsm["X_scgpt"]
    out = {
        "cells": spec["cells"],
        "mode": spec["mode"],
        "n_cells": int(adata.n_obs),
        "seconds": wall,
        "cells_per_s": adata.n_obs / wall,
        "cpu_s": cpu,
        "cpu_ms_per_cell": 1e3 * cpu / adata.n_obs,
        "rss_before_mib": rss_before,
        "peak_rss_sampled_mib": sampler.peak,
        "ru_maxrss_mib": peak_rss_mib(),
        "growth_mib": sampler.peak - rss_before,
        "output_mib": emb.nbytes / 2**20,
        "growth_beyond_output_mib": sampler.peak - rss_before - emb.nbytes / 2**20,
    }
    log(
        f"{spec['mode']} {adata.n_obs} cells: {out['cells_per_s']:.0f} cells/s, "
        f"+{out['growth_mib']:.0f} MiB"
    )
    # After the measurements: one bare read pass (page cache warm), and the check.
    if backed:
        started = time.perf_counter()
        for _ in iter_chunks(adata, chunk_size=spec["chunk_size"]):
            pass
        out["read_pass_s"] = time.perf_counter() - started
    if spec.get("check"):
        # The file's first cells are the source in order; tokens are drawn in dataset order,
        # so they must get the embeddings of the source embedded on its own.
        sft.tl.embed_cells(source, MODEL, device="cpu", batch_size=spec["batch_size"])
        out["check_cells"] = int(source.n_obs)
        out["max_abs_diff_vs_source"] = float(
            np.abs(emb[: source.n_obs] - source.obsm["X_scgpt"]).max()
        )
    return out


JOBS = {"embed": job_embed}


# driver ------------------------------------------------------------------------------------------
def _markdown(payload: dict[str, Any]) -> str:
    m, st = payload["machine"], payload["settings"]
    table = markdown_table(
        payload["runs"],
        [
            ("cells", "data"),
            ("mode", "input"),
            ("n_cells", "cells"),
            ("file_gib", "file (GiB)"),
            ("cells_per_s", "cells/s"),
            ("cpu_ms_per_cell", "CPU ms/cell"),
            ("rss_before_mib", "RSS before (MiB)"),
            ("peak_rss_sampled_mib", "peak RSS (MiB)"),
            ("growth_mib", "growth (MiB)"),
            ("output_mib", "embeddings (MiB)"),
            ("growth_beyond_output_mib", "growth beyond embeddings (MiB)"),
            ("read_pass_s", "one read pass (s)"),
        ],
    )

    def load(values: list[float] | None) -> str:
        return "/".join(f"{v:.1f}" for v in values) if values else "unknown"

    lines = [
        "# Out-of-core embedding (backed .h5ad)",
        "",
        f"`{payload['command']}` on {m['cpu_model']}, torch {m['torch']}, "
        f"**{m['torch_threads']} torch threads**, commit {m['git_commit']}, "
        f"{st['wall_s']:.0f} s in all; load average {load(m['load_average'])} at the start, "
        f"{load(st['load_average_end'])} at the end ({m['logical_cpus']} logical CPUs). On a "
        "shared machine wall-clock cells/s depend on the load; CPU ms per cell (user + system, "
        "all threads) much less.",
        "",
        "`sft.tl.embed_cells(adata, 'scgpt-default', device='cpu')` (the embedded model) "
        f"(batch size {st['batch_size']}, chunks of {st['chunk_size']} cells; input checks "
        f"included) on real PBMCs ({DATA_FILE}, 11,221 genes) and on deep cells ({DEEP_FILE}, "
        "11,533 genes, ~5,900 non-zero per cell), each replicated into an uncompressed "
        "CSR .h5ad, read with `backed='r'`; each run in a fresh process. RSS before: after "
        "imports, model warm-up and opening the file; peak: sampled every 20 ms during the "
        "call; growth beyond embeddings: growth minus the returned n x 64 float32 matrix. "
        "One read pass: a bare `iter_chunks` sweep afterwards (page cache warm).",
        "",
        table,
        "",
        "## Checks",
        "",
    ]
    lines += [f"- {n}" for n in payload["notes"]]
    return "\n".join(lines)


def _command(argv: list[str]) -> str:
    """The command line as run, with the scratch folder (a local path) left out."""
    shown, skip = [], False
    for arg in argv:
        if skip:
            skip = False
            shown.append("DIR")
        elif arg == "--workdir":
            skip = True
            shown.append(arg)
        else:
            shown.append("--workdir=DIR" if arg.startswith("--workdir=") else arg)
    return " ".join(["python benchmarks/bench_out_of_core.py", *shown])


def _checks(
    runs: list[dict[str, Any]],
    flat_mib: float,
    peak_gib: float,
    linear_tolerance: float,
    deep_ratio: float,
) -> dict[str, Any]:
    """The four checks (flat, bounded, linear, deep bounded) and the notes that state them."""
    backed = [r for r in runs if r["mode"] == "backed" and r["cells"] == "pbmc"]
    first, last = backed[0], backed[-1]
    base = first["growth_beyond_output_mib"]
    most = max(backed, key=lambda r: r["growth_beyond_output_mib"])
    flat = most["growth_beyond_output_mib"] - base <= flat_mib
    peak = max(r["peak_rss_sampled_mib"] for r in backed) / 1024
    bounded = peak < peak_gib
    time_ratio = last["cpu_ms_per_cell"] / first["cpu_ms_per_cell"]
    linear = time_ratio <= linear_tolerance
    notes = [
        f"memory {'flat' if flat else 'NOT flat'}: growth beyond the embeddings is "
        f"{base:.0f} MiB at {first['n_cells']:,} cells and at most "
        f"{most['growth_beyond_output_mib']:.0f} MiB (at {most['n_cells']:,} cells) up to "
        f"{last['n_cells']:,} cells, within the bound of +{flat_mib:.0f} MiB over the smallest "
        f"size: {flat}.",
        f"memory bounded: the largest peak RSS, {peak:.2f} GiB, is under the fixed bound of "
        f"{peak_gib:g} GiB: {bounded}.",
        f"time linear: CPU ms per cell {last['cpu_ms_per_cell']:.2f} at {last['n_cells']:,} "
        f"cells vs {first['cpu_ms_per_cell']:.2f} at {first['n_cells']:,} "
        f"(x{time_ratio:.2f}; linear within x{linear_tolerance:g}): {linear}.",
        f"correctness: the first {first['check_cells']:,} cells of the backed file vs the "
        f"source embedded in memory: max abs diff {first['max_abs_diff_vs_source']:.1e}.",
    ]
    deep = [r for r in runs if r["cells"] == "deep"]
    deep_bounded = True
    if deep:
        low, high = deep[0], deep[-1]
        ratio = high["peak_rss_sampled_mib"] / low["peak_rss_sampled_mib"]
        deep_bounded = ratio < deep_ratio
        notes.append(
            f"deep cells, memory set by the chunk: peak RSS {high['peak_rss_sampled_mib']:,.0f} "
            f"MiB at {high['n_cells']:,} cells ({high['cells_per_s']:.0f} cells/s) vs "
            f"{low['peak_rss_sampled_mib']:,.0f} MiB at {low['n_cells']:,} "
            f"({low['cells_per_s']:.0f} cells/s): x{ratio:.3f}, under x{deep_ratio:g}: "
            f"{deep_bounded}; first {low['check_cells']} cells vs the source in memory: max abs "
            f"diff {low['max_abs_diff_vs_source']:.1e}."
        )
    memory = [r for r in runs if r["mode"] == "memory"]
    if memory:
        notes.append(
            f"the same {memory[0]['n_cells']:,} cells loaded in memory: RSS before "
            f"{memory[0]['rss_before_mib']:.0f} MiB vs {first['rss_before_mib']:.0f} MiB backed "
            "(the matrix itself), cells/s "
            f"{memory[0]['cells_per_s']:.0f} vs {first['cells_per_s']:.0f}."
        )
    return {
        "memory_flat": flat,
        "memory_bounded": bounded,
        "time_linear": linear,
        "deep_memory_bounded": deep_bounded,
        "notes": notes,
    }


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark (or, with ``--worker``, one job of it)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--sizes", type=int, nargs="+", default=[10_000, 100_000], help="cells per file"
    )
    parser.add_argument(
        "--deep-sizes",
        type=int,
        nargs="*",
        default=[10_000, 100_000],
        help="cells per deep-cell file (none: skip them)",
    )
    parser.add_argument(
        "--deep-ratio",
        type=float,
        default=1.3,
        help="bound on the largest / smallest deep size's peak RSS",
    )
    parser.add_argument("--threads", type=int, default=2, help="torch threads (default 2)")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument(
        "--chunk-size", type=int, default=2_000, help="cells per chunk (the package default)"
    )
    parser.add_argument("--flat-mib", type=float, default=64.0, help="flatness bound (MiB)")
    parser.add_argument("--peak-gib", type=float, default=4.0, help="peak RSS bound (GiB)")
    parser.add_argument(
        "--linear-tolerance",
        type=float,
        default=1.25,
        help="largest / smallest size's CPU ms per cell still counted as linear time",
    )
    parser.add_argument("--workdir", help="folder for the generated files (default: a temp dir)")
    parser.add_argument("--out", default=NAME, help="results/<out>.{json,md}")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.worker:
        spec = json.loads(args.worker)
        worker_reply(JOBS[spec["job"]](spec))
        return 0

    set_threads(args.threads)
    machine = machine_info(args.threads)
    data = shared_path("SFT_DATA", "../shared/data")
    # (data, source, size, modes, check against the source): PBMCs first, then deep cells
    plan = [
        ("pbmc", data / DATA_FILE, n, ["backed", "memory"] if i == 0 else ["backed"], i == 0)
        for i, n in enumerate(sorted(set(args.sizes)))
    ]
    plan += [
        ("deep", data / DEEP_FILE, n, ["backed"], i == 0)
        for i, n in enumerate(sorted(set(args.deep_sizes)))
    ]
    script = Path(__file__).resolve()
    wall = time.perf_counter()
    runs, files = [], []
    with tempfile.TemporaryDirectory(prefix="bench_ooc_", dir=args.workdir) as tmp:
        for cells, source, n, modes, check in plan:
            path = Path(tmp) / f"{cells}_{n}.h5ad"
            built = {"cells": cells, **write_replicated_h5ad(source, n, path, block=WRITE_BLOCK)}
            files.append(built)
            print(f"== {cells} {n} cells: {built['file_gib']:.2f} GiB in {built['build_s']:.0f} s")
            for mode in modes:
                spec = {
                    "job": "embed",
                    "cells": cells,
                    "mode": mode,
                    "path": str(path),
                    "source": str(source),
                    "threads": args.threads,
                    "batch_size": args.batch_size,
                    "chunk_size": args.chunk_size,
                    "check": check and mode == "backed",
                }
                reply = run_worker(script, spec, threads=args.threads)
                runs.append({**reply, "file_gib": built["file_gib"]})
                print(
                    f"   {mode:6s} {reply['cells_per_s']:7.1f} cells/s, RSS "
                    f"{reply['rss_before_mib']:.0f} -> {reply['peak_rss_sampled_mib']:.0f} MiB "
                    f"(+{reply['growth_mib']:.0f}, {reply['growth_beyond_output_mib']:.0f} "
                    "beyond the embeddings)"
                )
            path.unlink()

    checks = _checks(runs, args.flat_mib, args.peak_gib, args.linear_tolerance, args.deep_ratio)
    payload = {
        "command": _command(argv if argv is not None else sys.argv[1:]),
        "machine": machine,
        "settings": {
            "sizes": sorted(set(args.sizes)),
            "deep_sizes": sorted(set(args.deep_sizes)),
            "deep_ratio": args.deep_ratio,
            "threads": args.threads,
            "batch_size": args.batch_size,
            "chunk_size": args.chunk_size,
            "flat_bound_mib": args.flat_mib,
            "peak_bound_gib": args.peak_gib,
            "linear_tolerance": args.linear_tolerance,
            "data": display_path(data / DATA_FILE),
            "deep_data": display_path(data / DEEP_FILE),
            "wall_s": time.perf_counter() - wall,
            "load_average_end": load_average(),
        },
        "files": files,
        "runs": runs,
        **checks,
    }
    json_path, md_path = write_results(args.out, payload, _markdown(payload))
    print("\n".join(checks["notes"]))
    print(f"wrote {display_path(json_path)} and {display_path(md_path)}")
    passed = all(
        checks[k] for k in ("memory_flat", "memory_bounded", "time_linear", "deep_memory_bounded")
    )
    return 0 if passed else 1


if __name__ == "__main__":
    raise SystemExit(main())
