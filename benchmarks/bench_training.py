"""scGPT pretraining throughput: cells/s and tokens/s, one process vs DDP, plus MFU on a GPU.

A small scGPT (``--d-model`` 64, 2 layers, 4 heads, d_hid 128, ``--max-seq-len`` 256) is
pretrained with the published objective (masked gene-expression prediction + MVC) through
``SCGPT.train`` on real full-transcriptome cells (``--cells`` 256 of the 450 cells x 11,533 genes
of ``cellbench_3celllines_celseq2_dropseq.h5ad``, every gene in the vocabulary; ``--epochs`` 3).
Configurations, each in a fresh process:

* CPU (default): one process with 1 thread, one process with 2 threads, and 2 DDP processes
  (``strategy="ddp"``, gloo) with 1 thread each, all with ``--batch-size`` cells per process;
* GPU (``--accelerator gpu``): ``--devices`` 1 and, if more, the larger count, with
  ``--precision`` (e.g. ``bf16-mixed``); MFU = 6 x parameters x tokens/s / (devices x
  ``--peak-tflops`` x 1e12). Parameters are those of the module without its gene-embedding table
  (a lookup, not a matmul); attention's own FLOPs are left out, so MFU is a lower bound.

Throughput is measured over the epochs after the first (warm-up: process start, data loading,
first allocations): cells and non-padding tokens summed over all processes, divided by the
wall-clock time of those epochs (rank 0's clock; DDP steps in lock step). The run also checks
that the DDP processes end with identical weights.

    python benchmarks/bench_training.py                     # CPU, ~5 min on 2 busy cores
    python benchmarks/bench_training.py --accelerator gpu --devices 1 2 --precision bf16-mixed \\
        --peak-tflops 989 --cells 4096 --d-model 512 --n-layers 12 --max-seq-len 1200

Writes benchmarks/results/training.json and training.md (CPU) or training_gpu.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from typing import Any

from _common import (
    display_path,
    machine_info,
    markdown_table,
    run_worker,
    set_threads,
    shared_path,
    worker_reply,
    write_results,
)

DATA = "cellbench_3celllines_celseq2_dropseq.h5ad"


# worker ------------------------------------------------------------------------------------------
def _worker(spec: dict[str, Any]) -> None:
    set_threads(spec["threads"])
    import warnings

    import anndata as ad
    import numpy as np
    import torch
    from lightning.pytorch.callbacks import Callback

    from scfm_tools.models import SCGPT

    warnings.filterwarnings("ignore")

    class Meter(Callback):
        """Per epoch: wall time, cells and non-padding tokens, summed over processes."""

        def __init__(self) -> None:
            self.epochs: list[dict[str, float]] = []

        def on_train_epoch_start(self, trainer, pl_module) -> None:
            trainer.strategy.barrier("meter")
            self.start, self.cells, self.tokens = time.perf_counter(), 0, 0

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
            self.cells += int(batch["padding_mask"].shape[0])
            self.tokens += int((~batch["padding_mask"]).sum())

        def on_train_epoch_end(self, trainer, pl_module) -> None:
            if trainer.strategy.root_device.type == "cuda":
                torch.cuda.synchronize()
            trainer.strategy.barrier("meter")
            seconds = time.perf_counter() - self.start
            counts = torch.tensor([self.cells, self.tokens], dtype=torch.float64)
            counts = trainer.strategy.reduce(counts.to(pl_module.device), reduce_op="sum")
            cells, tokens = (float(x) for x in counts.cpu())
            self.epochs.append({"seconds": seconds, "cells": cells, "tokens": tokens})

        def on_train_end(self, trainer, pl_module) -> None:
            weights = torch.cat([p.detach().float().flatten() for p in pl_module.parameters()])
            gathered = trainer.strategy.all_gather(weights)
            spread = float((gathered - gathered[:1]).abs().max()) if gathered.dim() > 1 else 0.0
            if not trainer.is_global_zero:
                return
            module = pl_module.module
            n_params = sum(p.numel() for p in module.parameters())
            n_embed = module.encoder.embedding.weight.numel()
            worker_reply(
                {
                    "epochs": self.epochs,
                    "world_size": trainer.world_size,
                    "params": n_params,
                    "params_non_embedding": n_params - n_embed,
                    "max_weight_spread_across_ranks": spread,
                }
            )

    adata = ad.read_h5ad(spec["data"])
    if spec["cells"] < adata.n_obs:
        rows = np.sort(np.random.default_rng(0).choice(adata.n_obs, spec["cells"], replace=False))
        adata = adata[rows].copy()
    elif spec["cells"] > adata.n_obs:  # GPU runs: the real cells repeated
        reps = -(-spec["cells"] // adata.n_obs)
        adata = ad.concat([adata] * reps)[: spec["cells"]].copy()
        adata.obs_names_make_unique()
    adata.X = adata.X.astype(np.float32)
    SCGPT.setup_anndata(adata)
    torch.manual_seed(0)
    model = SCGPT(
        adata,
        d_model=spec["d_model"],
        n_heads=spec["n_heads"],
        d_hid=spec["d_hid"],
        n_layers=spec["n_layers"],
        max_seq_len=spec["max_seq_len"],
        dropout=0.1,
    )
    kwargs: dict[str, Any] = {}
    if spec["precision"]:
        kwargs["precision"] = spec["precision"]
    model.train(
        max_epochs=spec["epochs"],
        accelerator=spec["accelerator"],
        devices=spec["devices"],
        strategy="ddp" if spec["devices"] > 1 else "auto",
        batch_size=spec["batch_size"],
        train_size=1.0,
        enable_progress_bar=False,
        callbacks=[Meter()],
        log_save_dir=spec["log_dir"],
        plan_kwargs={"lr": 1e-3, "random_state": 0},
        **kwargs,
    )


# driver ------------------------------------------------------------------------------------------
def _summarise(label: str, spec: dict[str, Any], reply: dict[str, Any], peak: float | None):
    steady = reply["epochs"][1:] or reply["epochs"]
    seconds = sum(e["seconds"] for e in steady)
    cells = sum(e["cells"] for e in steady)
    tokens = sum(e["tokens"] for e in steady)
    row: dict[str, Any] = {
        "config": label,
        "processes": reply["world_size"],
        "threads_per_process": spec["threads"],
        "batch_size_per_process": spec["batch_size"],
        "epochs_timed": len(steady),
        "seconds": seconds,
        "cells_per_s": cells / seconds,
        "tokens_per_s": tokens / seconds,
        "tokens_per_cell": tokens / cells,
        "params": reply["params"],
        "params_non_embedding": reply["params_non_embedding"],
        "max_weight_spread_across_ranks": reply["max_weight_spread_across_ranks"],
    }
    if peak is not None:
        flops = 6 * reply["params_non_embedding"] * row["tokens_per_s"]
        row["model_tflops_per_s"] = flops / 1e12
        row["mfu"] = flops / (peak * 1e12 * reply["world_size"])
    return row


def main(argv: list[str] | None = None) -> int:
    """Run the configurations and write the results."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--accelerator", choices=["cpu", "gpu"], default="cpu")
    parser.add_argument("--devices", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--precision", default=None, help="e.g. bf16-mixed (GPU)")
    parser.add_argument("--peak-tflops", type=float, default=None, help="per device, for MFU")
    parser.add_argument("--cells", type=int, default=256)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--d-model", type=int, default=64)
    parser.add_argument("--n-heads", type=int, default=4)
    parser.add_argument("--d-hid", type=int, default=128)
    parser.add_argument("--n-layers", type=int, default=2)
    parser.add_argument("--max-seq-len", type=int, default=256)
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        _worker(json.loads(args.worker))
        return 0
    if args.accelerator == "gpu" and args.peak_tflops is None:
        parser.error("--accelerator gpu needs --peak-tflops (the device's dense peak, TFLOP/s).")

    data = shared_path("SFT_DATA", "../shared/data") / DATA
    base = {
        "data": str(data),
        "accelerator": args.accelerator,
        "precision": args.precision,
        "cells": args.cells,
        "epochs": args.epochs,
        "batch_size": args.batch_size,
        "d_model": args.d_model,
        "n_heads": args.n_heads,
        "d_hid": args.d_hid,
        "n_layers": args.n_layers,
        "max_seq_len": args.max_seq_len,
    }
    if args.accelerator == "cpu":
        configs = [
            ("1 process x 1 thread", {"devices": 1, "threads": 1}),
            ("1 process x 2 threads", {"devices": 1, "threads": 2}),
            ("2 DDP processes (gloo) x 1 thread", {"devices": 2, "threads": 1}),
        ]
        configs = [c for c in configs if c[1]["devices"] in args.devices]
    else:
        configs = [(f"{n} GPU(s), {args.precision or 'fp32'}", {"devices": n, "threads": 4})
                   for n in args.devices]  # fmt: skip
    rows = []
    with tempfile.TemporaryDirectory() as logs:
        for label, extra in configs:
            spec = {**base, **extra, "log_dir": logs}
            print(f"[bench] {label} ...", flush=True)
            start = time.perf_counter()
            reply = run_worker(__file__, spec, threads=extra["threads"], timeout=1200)
            row = _summarise(label, spec, reply, args.peak_tflops)
            row["process_wall_s"] = time.perf_counter() - start
            rows.append(row)
            print(
                f"[bench]   {row['cells_per_s']:.1f} cells/s, {row['tokens_per_s']:,.0f} tokens/s",
                flush=True,
            )
    first = rows[0]["cells_per_s"]
    for row in rows:
        row["speedup_vs_first"] = row["cells_per_s"] / first

    name = "training" if args.accelerator == "cpu" else "training_gpu"
    columns = [
        ("config", "configuration"),
        ("batch_size_per_process", "batch/process"),
        ("cells_per_s", "cells/s"),
        ("tokens_per_s", "tokens/s"),
        ("speedup_vs_first", "vs first row"),
        ("max_weight_spread_across_ranks", "max weight spread across ranks"),
    ]
    if args.peak_tflops is not None:
        columns += [("model_tflops_per_s", "model TFLOP/s"), ("mfu", "MFU")]
    machine = machine_info()
    model_line = (
        f"scGPT d_model {args.d_model}, {args.n_layers} layers, {args.n_heads} heads, d_hid "
        f"{args.d_hid}, max_seq_len {args.max_seq_len}: {rows[0]['params']:,} parameters "
        f"({rows[0]['params_non_embedding']:,} without the gene-embedding table)"
    )
    markdown = "\n".join(
        [
            f"# scGPT pretraining throughput ({args.accelerator})",
            "",
            f"{model_line}; {args.cells} real cells of `{DATA}` "
            f"({rows[0]['tokens_per_cell']:.0f} tokens per cell), masked gene-expression "
            f"prediction + MVC through `SCGPT.train`; {args.epochs} epochs, timed over epochs "
            "2 onwards, cells and tokens summed over processes.",
            "",
            markdown_table(rows, columns),
            "",
            f"Machine: {machine['cpu_model']}, {machine['logical_cpus']} logical CPUs, GPU "
            f"{machine['gpu']}; load average {machine['load_average']} (a load above the core "
            "count means the figures are low). Figures from one run on a shared machine: "
            "compare rows within this table only.",
        ]
    )
    if args.peak_tflops is not None:
        markdown += (
            f"\n\nMFU = 6 x {rows[0]['params_non_embedding']:,} x tokens/s / (devices x "
            f"{args.peak_tflops:g} TFLOP/s); attention FLOPs not counted."
        )
    payload = {
        "settings": {**{k: v for k, v in base.items() if k != "data"}, "data": display_path(data)},
        "peak_tflops": args.peak_tflops,
        "machine": machine,
        "rows": rows,
    }
    json_path, md_path = write_results(name, payload, markdown)
    print(f"wrote {display_path(json_path)} and {display_path(md_path)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
