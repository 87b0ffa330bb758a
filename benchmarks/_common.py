"""Small helpers shared by the benchmark scripts: timing, memory, machine info, result files.

Every benchmark writes ``results/<name>.json`` (everything measured, plus the machine) and
``results/<name>.md`` (the headline table). Paths written into results are relative to the
repository root or bare file names: results are committed and must not name this machine.

Memory is measured in fresh child processes (:func:`run_worker`): torch allocates outside the
Python heap, so ``tracemalloc`` misses it, and a process's RSS high-water mark
(``resource.getrusage``) only means something for the one configuration the process ran.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import json
import os
import platform
import resource
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

__all__ = [
    "OFFICIAL_CPU_CELLS_PER_S",
    "REPO_ROOT",
    "RESULTS_DIR",
    "SPEED_TARGETS",
    "Stopwatch",
    "cpu_seconds",
    "cuda_peak_mib",
    "current_rss_mib",
    "display_path",
    "load_average",
    "log",
    "machine_info",
    "markdown_table",
    "peak_rss_mib",
    "reset_cuda_peak",
    "run_worker",
    "set_threads",
    "shared_path",
    "synchronize",
    "worker_reply",
    "write_replicated_h5ad",
    "write_results",
]

REPO_ROOT = Path(__file__).resolve().parent.parent
RESULTS_DIR = Path(__file__).resolve().parent / "results"
# The official implementations' cells/s on 2 CPU threads at the published sizes, random
# weights (../shared/reference/README.md, "CPU throughput anchors"): other runs on another job,
# so ratios against them are indicative, unlike the same-run baselines of each script.
OFFICIAL_CPU_CELLS_PER_S = {
    "scgpt": 0.26,
    "scbert": 0.060,
    "scfoundation_cell": 0.072,
    "scfoundation_expression": 0.045,
    "cellplm": 122.0,
}
# The issues' speed targets: ours / official anchor.
SPEED_TARGETS = {
    "scgpt": 3.0,
    "scbert": 5.0,
    "scfoundation_cell": 10.0,
    "scfoundation_expression": 10.0,
    "cellplm": 2.0,
}
# A worker prints its answer on one stdout line after this marker; anything else is log output.
_REPLY_MARKER = "@@BENCH-RESULT@@ "


def log(msg: str) -> None:
    """Progress line on stderr (a worker's stderr is echoed by the parent)."""
    print(f"[bench] {msg}", file=sys.stderr, flush=True)


# paths -------------------------------------------------------------------------------------------
def shared_path(env_var: str, default: str) -> Path:
    """A shared input folder: ``$env_var`` if set, else ``default`` relative to the repo root."""
    value = os.environ.get(env_var)
    path = Path(value).expanduser() if value else REPO_ROOT / default
    return path.resolve()


def display_path(path: str | os.PathLike) -> str:
    """``path`` relative to the repository root when it can be, else its bare name.

    Results files are committed: they must not carry an absolute path of this machine.
    """
    path = Path(path).resolve()
    try:
        return os.path.relpath(path, REPO_ROOT)
    except ValueError:  # another drive (Windows)
        return path.name


# threads and devices ----------------------------------------------------------------------------
def set_threads(n: int) -> None:
    """Pin torch (and the BLAS/OpenMP pools of children) to ``n`` threads."""
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        os.environ[var] = str(n)
    import torch

    torch.set_num_threads(n)
    # Only settable before the first parallel region; a second call in the same process fails.
    with contextlib.suppress(RuntimeError):
        torch.set_num_interop_threads(1)


def synchronize(device: str) -> None:
    """Wait for queued GPU work, so that wall-clock time covers it."""
    if str(device).startswith("cuda"):
        import torch

        torch.cuda.synchronize()


# timing ------------------------------------------------------------------------------------------
class Stopwatch:
    """Accumulates wall-clock seconds per label: ``with sw("model"): ...``."""

    def __init__(self, device: str = "cpu") -> None:
        self.device = device
        self.seconds: dict[str, float] = {}

    @contextlib.contextmanager
    def __call__(self, label: str) -> Iterator[None]:
        synchronize(self.device)
        start = time.perf_counter()
        try:
            yield
        finally:
            synchronize(self.device)
            self.seconds[label] = self.seconds.get(label, 0.0) + time.perf_counter() - start


# memory ------------------------------------------------------------------------------------------
def cpu_seconds() -> float:
    """User + system CPU time of this process, all threads (less load-sensitive than wall)."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def peak_rss_mib() -> float:
    """High-water mark of this process's resident memory, MiB (``ru_maxrss``)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    # Linux reports KiB, macOS bytes.
    return peak / (1024 * 1024) if sys.platform == "darwin" else peak / 1024


def current_rss_mib() -> float:
    """Resident memory of this process now, MiB (``/proc/self/statm``; peak where unavailable)."""
    try:
        with open("/proc/self/statm", encoding="ascii") as fh:
            pages = int(fh.read().split()[1])
        return pages * os.sysconf("SC_PAGE_SIZE") / 2**20
    except (OSError, ValueError, IndexError):
        return peak_rss_mib()


def reset_cuda_peak() -> None:
    """Reset torch's CUDA peak-allocation counter (no-op without CUDA)."""
    import torch

    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()


def cuda_peak_mib() -> float | None:
    """Peak CUDA memory allocated by torch since the last reset, MiB (``None`` without CUDA)."""
    import torch

    if not torch.cuda.is_available():
        return None
    return torch.cuda.max_memory_allocated() / 2**20


# machine -----------------------------------------------------------------------------------------
def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def load_average() -> list[float] | None:
    """1, 5 and 15-minute load averages (``None`` where the platform has none)."""
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except (OSError, AttributeError):
        return None


def machine_info(threads: int | None = None) -> dict[str, Any]:
    """Versions and hardware that the figures depend on."""
    import numpy as np
    import torch

    try:
        from scfm_tools import __version__ as sft_version
    except ImportError:
        sft_version = None
    info: dict[str, Any] = {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "torch": torch.__version__,
        "numpy": np.__version__,
        "scfm_tools": sft_version,
        "cpu_model": _cpu_model(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "logical_cpus": os.cpu_count(),
        "torch_threads": threads if threads is not None else torch.get_num_threads(),
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        # Shared machines are noisy: a load above the core count means the figures are low.
        "load_average": load_average(),
    }
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            cwd=REPO_ROOT,
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=REPO_ROOT,
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        ).stdout.strip()
        info["git_commit"] = commit + ("+dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        info["git_commit"] = None
    return info


# child processes ---------------------------------------------------------------------------------
def worker_reply(payload: dict[str, Any]) -> None:
    """Send a worker's answer back to :func:`run_worker` (one marked JSON line on stdout)."""
    sys.stdout.write(_REPLY_MARKER + json.dumps(payload) + "\n")
    sys.stdout.flush()


def run_worker(
    script: str | os.PathLike,
    spec: dict[str, Any],
    *,
    threads: int,
    timeout: float | None = None,
    echo: Callable[[str], None] | None = print,
    pythonpath: str | os.PathLike | None = None,
) -> dict[str, Any]:
    """Run ``python script --worker <spec>`` in a fresh process and return its reply.

    The child's log lines (stderr) are passed to ``echo``; a child that fails or sends no reply
    raises ``RuntimeError`` with the end of its output. ``pythonpath`` puts a folder first on
    the child's import path (e.g. another commit's ``src``).
    """
    env = dict(os.environ)
    if pythonpath is not None:
        env["PYTHONPATH"] = str(pythonpath)
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        env[var] = str(threads)
    proc = subprocess.run(
        [sys.executable, str(script), "--worker", json.dumps(spec)],
        cwd=REPO_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
    if echo is not None:
        for line in proc.stderr.splitlines():
            if line.startswith("[bench]"):
                echo("    " + line)
    replies = [ln for ln in proc.stdout.splitlines() if ln.startswith(_REPLY_MARKER)]
    if proc.returncode != 0 or not replies:
        tail = "\n".join((proc.stdout + proc.stderr).splitlines()[-30:])
        raise RuntimeError(f"worker {spec.get('job')} failed (exit {proc.returncode}):\n{tail}")
    return json.loads(replies[-1][len(_REPLY_MARKER) :])


# data --------------------------------------------------------------------------------------------
def write_replicated_h5ad(
    source: Path, n_cells: int, path: Path, *, block: int = 10_000
) -> dict[str, Any]:
    """Replicate the cells of ``source`` (in order) into a CSR ``.h5ad`` of ``n_cells``.

    Written ``block`` cells at a time, so the file can be far larger than memory; ``obs`` keeps
    the source's ``batch`` column. Returns the size, build time and non-zeros per cell.
    """
    import anndata as ad
    import h5py
    import numpy as np
    import pandas as pd
    from anndata.io import sparse_dataset, write_elem

    started = time.perf_counter()
    src = ad.read_h5ad(source)
    X = src.X.tocsr()
    rows = np.arange(n_cells) % src.n_obs
    copy = (np.arange(n_cells) // src.n_obs).astype(str)
    names = pd.Index(src.obs_names.to_numpy()[rows].astype(str)) + "-" + pd.Index(copy)
    obs = pd.DataFrame({"batch": pd.Categorical(src.obs["batch"].to_numpy()[rows])}, index=names)
    ad.AnnData(obs=obs, var=src.var).write_h5ad(path)
    with h5py.File(path, "a") as f:
        for start in range(0, n_cells, block):
            part = X[rows[start : start + block]]
            if start == 0:
                write_elem(f, "X", part)
            else:
                sparse_dataset(f["X"]).append(part)
    return {
        "n_cells": n_cells,
        "file_gib": path.stat().st_size / 2**30,
        "build_s": time.perf_counter() - started,
        "nnz_per_cell": float(X.nnz / src.n_obs),
    }


# results -----------------------------------------------------------------------------------------
def _cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        if value == 0:
            return "0"
        if abs(value) < 1e-2:
            return f"{value:.1e}"
        if abs(value) < 10:
            return f"{value:.3g}"
        return f"{value:,.0f}" if abs(value) >= 1000 else f"{value:.1f}"
    return str(value).replace("|", "\\|")


def markdown_table(rows: Sequence[dict[str, Any]], columns: Sequence[tuple[str, str]]) -> str:
    """A GitHub Markdown table: ``columns`` are ``(key, header)`` pairs, missing keys show '-'."""
    lines = [
        "| " + " | ".join(header for _, header in columns) + " |",
        "|" + "|".join("---" for _ in columns) + "|",
    ]
    for row in rows:
        lines.append("| " + " | ".join(_cell(row.get(key)) for key, _ in columns) + " |")
    return "\n".join(lines)


def write_results(name: str, payload: dict[str, Any], markdown: str) -> tuple[Path, Path]:
    """Write ``results/<name>.json`` (payload + timestamp) and ``results/<name>.md``."""
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    payload = {
        "benchmark": name,
        "created": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
        **payload,
    }
    json_path = RESULTS_DIR / f"{name}.json"
    md_path = RESULTS_DIR / f"{name}.md"
    json_path.write_text(json.dumps(payload, indent=2) + "\n", encoding="utf-8")
    md_path.write_text(markdown.rstrip() + "\n", encoding="utf-8")
    return json_path, md_path
