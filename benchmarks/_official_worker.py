"""Runs inside an official repository's venv for ``bench_vs_official.py``: builds a checkpoint
in the official on-disk format, or times the official user entry point. One job per process.

    <venv>/bin/python benchmarks/_official_worker.py '<json spec>'

The spec names the ``job`` (``"build"`` or ``"run"``), the ``family``, the snapshot folder
``src`` and a ``work`` folder (see ``bench_vs_official.py`` for the layout). The official code
is imported from the snapshot and run unmodified; the only additions are instrumentation
around it: seeds set before the call, scFoundation's unconditional ``.cuda()`` calls made no-ops
on CPU, and a forward hook on scBERT's final ``LayerNorm`` to read the encodings that
``predict.py`` turns into labels. Only the standard library, numpy, torch and what the official
code imports are used here (not ``scfm_tools``).
"""

from __future__ import annotations

import json
import os
import pickle
import runpy
import sys
import time
from pathlib import Path
from typing import Any

from _common import peak_rss_mib, set_threads, worker_reply

# Published architectures (../shared/reference/README.md).
SCGPT_ARGS = {
    "embsize": 512,
    "nheads": 8,
    "d_hid": 512,
    "nlayers": 12,
    "n_layers_cls": 3,
    "dropout": 0.2,
    "pad_token": "<pad>",
    "pad_value": -2,
    "mask_value": -1,
    "n_bins": 51,
    "max_seq_len": 1200,
    "input_style": "binned",
    "input_emb_style": "continuous",
    "fast_transformer": True,
    "MVC": True,
    "USE_CLS": True,
    "no_cce": True,
}
SCF_DATASET_CONFIG = {
    "bin_type": "auto_bin",
    "value_mask_prob": 0.3,
    "zero_mask_prob": 0.03,
    "replace_prob": 0.8,
    "random_token_prob": 0.1,
    "mae_encoder_max_seq_len": 15000,
}
SCF_OUTPUT = "bench_01B-resolution_singlecell_cell_embedding_t4_resolution.npy"


# checkpoints ---------------------------------------------------------------------------------
def _build_cellplm(spec: dict[str, Any]) -> None:
    import torch
    from CellPLM.model import OmicsFormer

    folder, prefix = Path(spec["ckpt_dir"]), spec["prefix"]
    config = json.loads((folder / f"{prefix}.config.json").read_text())
    model = OmicsFormer(**config)
    torch.save({"model_state_dict": model.state_dict()}, folder / f"{prefix}.best.ckpt")


def _build_scgpt(spec: dict[str, Any]) -> None:
    import torch
    from scgpt.model import TransformerModel
    from scgpt.tokenizer import GeneVocab

    folder = Path(spec["ckpt_dir"])
    genes = json.loads(Path(spec["vocab_source"]).read_text())
    tokens = {g: i for i, g in enumerate(sorted(genes, key=genes.get))}
    for special in ("<pad>", "<cls>", "<eoc>"):
        tokens[special] = len(tokens)
    (folder / "vocab.json").write_text(json.dumps(tokens))
    (folder / "args.json").write_text(json.dumps(SCGPT_ARGS, indent=1))
    vocab = GeneVocab.from_file(folder / "vocab.json")
    a = SCGPT_ARGS
    model = TransformerModel(
        ntoken=len(vocab),
        d_model=a["embsize"],
        nhead=a["nheads"],
        d_hid=a["d_hid"],
        nlayers=a["nlayers"],
        nlayers_cls=a["n_layers_cls"],
        n_cls=1,
        vocab=vocab,
        dropout=a["dropout"],
        pad_token=a["pad_token"],
        pad_value=a["pad_value"],
        do_mvc=True,
        use_fast_transformer=False,
    )
    torch.save(model.state_dict(), folder / "best_model.pt")


def _build_scfoundation(spec: dict[str, Any]) -> None:
    import torch
    from pretrainmodels import select_model

    # The published configuration, from the parent (scfm_tools' card of the official model).
    model_config = spec["model_config"]
    model = select_model({**model_config, **SCF_DATASET_CONFIG})
    entry = {
        "config": {
            "model": "mae_autobin",
            "model_config": {"mae_autobin": model_config},
            "dataset_config": {"rnaseq": SCF_DATASET_CONFIG},
        },
        "state_dict": {f"model.{k}": v for k, v in model.state_dict().items()},
    }
    # Only the entry `--output_type cell --version ce` reads (the published file has three).
    torch.save({"cell": entry}, Path(spec["ckpt_dir"]) / "models.ckpt")


def _build_scbert(spec: dict[str, Any]) -> None:
    import numpy as np
    import torch
    from performer_pytorch import PerformerLM
    from torch import nn

    work = Path(spec["work"])
    n_genes = len((work / "gene_list.txt").read_text().split())
    # PerformerLM reads gene2vec from ../data relative to the working folder (here work/run).
    g2v = np.random.default_rng(spec["seed"]).normal(scale=0.1, size=(n_genes, 200))
    np.save(work / "data" / "gene2vec_16906.npy", g2v)
    os.chdir(work / "run")
    model = PerformerLM(
        num_tokens=7,
        dim=200,
        depth=6,
        max_seq_len=n_genes + 1,
        heads=10,
        local_attn_heads=0,
        g2v_position_emb=True,
    )
    # The fine-tuned classifier head of predict.py, by its state-dict layout.
    head = nn.Module()
    head.conv1 = nn.Conv2d(1, 1, (1, 200))
    head.fc1 = nn.Linear(n_genes + 1, 512)
    head.fc2 = nn.Linear(512, 128)
    head.fc3 = nn.Linear(128, len(spec["classes"]))
    model.to_out = head
    torch.save({"model_state_dict": model.state_dict()}, work / "finetuned.pth")
    with open(work / "run" / "label_dict", "wb") as fh:
        pickle.dump(np.array(spec["classes"]), fh)
    with open(work / "run" / "label", "wb") as fh:
        pickle.dump(np.arange(len(spec["classes"])).repeat(2), fh)


# official entry points -----------------------------------------------------------------------
def _run_cellplm(spec: dict[str, Any]):
    import anndata as ad
    import torch
    from CellPLM.pipeline.cell_embedding import CellEmbeddingPipeline

    started = time.perf_counter()
    adata = ad.read_h5ad(spec["input"])
    pipeline = CellEmbeddingPipeline(
        pretrain_prefix=spec["prefix"], pretrain_directory=spec["ckpt_dir"]
    )
    # The GMVAE latent draws its mixture component in eval mode; seeded so ours can match it.
    torch.manual_seed(0)
    emb = pipeline.predict(adata, ensembl_auto_conversion=False, device="cpu")
    return started, emb.cpu().numpy()


def _run_scgpt(spec: dict[str, Any]):
    import numpy as np
    import torch
    from scgpt.tasks import embed_data

    np.random.seed(0)  # noqa: NPY002  (the official code draws from the legacy global RNG)
    torch.manual_seed(0)
    started = time.perf_counter()
    out = embed_data(
        spec["input"], spec["ckpt_dir"], gene_col="index", device="cpu", return_new_adata=True
    )
    return started, np.asarray(out.X)


def _run_scfoundation(spec: dict[str, Any]):
    import numpy as np
    import pandas  # noqa: F401  (imported before the clock, as the script's own imports)
    import scanpy  # noqa: F401
    import torch

    # get_embedding.py calls .cuda() unconditionally; on CPU those calls must do nothing.
    torch.Tensor.cuda = lambda self, *a, **k: self
    torch.nn.Module.cuda = lambda self, *a, **k: self
    model_dir = Path(spec["src"]) / "model"
    os.chdir(model_dir)
    sys.path.insert(0, str(model_dir))
    sys.argv = [
        "get_embedding.py",
        "--task_name", "bench",
        "--input_type", "singlecell",
        "--output_type", "cell",
        "--pool_type", "all",
        "--tgthighres", "t4",
        "--data_path", spec["input"],
        "--save_path", spec["work"],
        "--pre_normalized", "F",
        "--version", "ce",
    ]  # fmt: skip
    started = time.perf_counter()
    runpy.run_path(str(model_dir / "get_embedding.py"), run_name="__main__")
    emb = np.load(Path(spec["work"]) / SCF_OUTPUT)
    return started, emb.reshape(-1, emb.shape[-1])  # the script squeezes a single cell's axis


def _run_scbert(spec: dict[str, Any]):
    import numpy as np
    import performer_pytorch
    import scanpy  # noqa: F401  (imported before the clock, as the scripts' own imports)
    import sklearn.metrics  # noqa: F401

    encodings: list[np.ndarray] = []

    def keep_mean_encoding(module, inputs, output) -> None:
        # predict.py feeds one cell per pass; the mean over the genes, pad position excluded.
        encodings.append(output[:, :-1].mean(1).numpy())

    original_init = performer_pytorch.PerformerLM.__init__

    def init_with_hook(self, *args, **kwargs) -> None:
        original_init(self, *args, **kwargs)
        self.norm.register_forward_hook(keep_mean_encoding)

    performer_pytorch.PerformerLM.__init__ = init_with_hook
    work, src = Path(spec["work"]), Path(spec["src"])
    started = time.perf_counter()
    os.chdir(work)
    sys.argv = ["preprocess.py"]
    runpy.run_path(str(src / "preprocess.py"), run_name="__main__")
    os.chdir(work / "run")
    sys.argv = [
        "predict.py",
        "--data_path", "../data/preprocessed_data.h5ad",
        "--model_path", "../finetuned.pth",
    ]  # fmt: skip
    runpy.run_path(str(src / "predict.py"), run_name="__main__")
    return started, np.concatenate(encodings)


BUILD = {
    "cellplm": _build_cellplm,
    "scgpt": _build_scgpt,
    "scfoundation": _build_scfoundation,
    "scbert": _build_scbert,
}
RUN = {
    "cellplm": _run_cellplm,
    "scgpt": _run_scgpt,
    "scfoundation": _run_scfoundation,
    "scbert": _run_scbert,
}


def main() -> None:
    spec = json.loads(sys.argv[1])
    set_threads(spec["threads"])
    src = Path(spec["src"])
    sys.path.insert(0, str(src / "model" if spec["family"] == "scfoundation" else src))
    import numpy as np
    import torch

    torch.manual_seed(spec.get("seed", 0))
    if spec["job"] == "build":
        started = time.perf_counter()
        BUILD[spec["family"]](spec)
        worker_reply({"seconds": time.perf_counter() - started})
        return
    imported = time.perf_counter()
    started, emb = RUN[spec["family"]](spec)
    seconds = time.perf_counter() - started
    np.save(spec["out"], np.asarray(emb, dtype=np.float32).reshape(len(emb), -1))
    worker_reply(
        {
            "seconds": seconds,
            "import_s": started - imported,
            "n_obs": len(emb),
            "peak_rss_mib": peak_rss_mib(),
            "threads": torch.get_num_threads(),
        }
    )


if __name__ == "__main__":
    main()
