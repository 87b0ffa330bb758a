"""The small models that ship inside the package: found offline, verified, and usable by tl.

Every shipped default is listed as embedded, its files match the sha256 of its card, and
``sft.tl.embed_cells(adata, model="<name>")`` runs on real cells with no network. The CellPLM
default is stored as safetensors and imputes offline (though not well enough to be the default).
"""

from __future__ import annotations

import anndata as ad
import numpy as np
import pytest

import scfm_tools as sft
from _unchanged import assert_unchanged, snapshot
from scfm_tools.hub import file_sha256
from scfm_tools.models import CellPLM
from scfm_tools.models.cellplm import load_cellplm_checkpoint

CELLBENCH = "cellbench_3celllines_celseq2_dropseq.h5ad"
SHIPPED = {"scgpt-default": "scgpt", "cellplm-default": "cellplm"}


@pytest.fixture(scope="module")
def cells(data_dir):
    """40 CellBench cells of both protocols (thousands of expressed genes each)."""
    adata = ad.read_h5ad(data_dir / CELLBENCH)
    rows = np.concatenate([np.arange(20), np.arange(adata.n_obs - 20, adata.n_obs)])
    return adata[rows].copy()


@pytest.mark.parametrize("name", sorted(SHIPPED))
def test_shipped_default_is_embedded_and_verified(name):
    card = sft.hub.get_card(name)
    assert card.embedded and card.family == SHIPPED[name]
    resolved = sft.hub.load(name)
    for entry in card.files:
        path = resolved.path / entry.name
        assert path.stat().st_size == entry.size and file_sha256(path) == entry.sha256
    assert sum(f.size for f in card.files) < 20 * 2**20  # all defaults together: ~40 MB


@pytest.mark.parametrize("name", sorted(SHIPPED))
def test_shipped_default_embeds_real_cells_offline(name, cells):
    snap = snapshot(cells)
    out = sft.tl.embed_cells(cells, model=name, copy=True)
    assert_unchanged(cells, snap)
    family = SHIPPED[name]
    X = out.obsm[f"X_{family}"]
    assert X.shape[0] == cells.n_obs and np.isfinite(X).all()
    assert out.uns[family]["params"]["model"] == name
    # cells of different protocols and cell lines do not collapse onto one vector
    assert np.linalg.matrix_rank(X, tol=1e-3) > 2


def test_cellplm_default_safetensors_and_imputation(cells, tmp_path):
    _, genes, config, report = load_cellplm_checkpoint("cellplm-default")
    assert not report.missing and not report.mismatched and len(genes) == config["out_dim"]
    model = CellPLM.from_pretrained("cellplm-default")
    assert model.gene_list == genes
    snap = snapshot(cells)
    with pytest.raises(NotImplementedError, match="no default model.*worse than no imputation"):
        sft.tl.impute(cells)
    assert_unchanged(cells, snap)
    out = sft.tl.impute(cells, "cellplm-default", copy=True)
    assert out.uns["cellplm_denoised"]["params"]["model"] == "cellplm-default"
    imputed = out.layers["cellplm_denoised"]
    assert imputed.shape == cells.shape and np.isfinite(imputed).all() and (imputed >= 0).all()
    # denoised, not copied: the model's values differ from the counts, yet follow them per cell
    counts = cells.X.toarray()
    assert not np.allclose(imputed, counts)
    per_cell = [
        np.corrcoef(np.log1p(a), np.log1p(b))[0, 1] for a, b in zip(imputed, counts, strict=True)
    ]
    assert np.median(per_cell) > 0.3
    # a damaged safetensors file is refused with a message naming it
    folder = tmp_path / "broken"
    folder.mkdir()
    source = sft.hub.load("cellplm-default").path
    (folder / "cellplm.config.json").write_bytes((source / "cellplm.config.json").read_bytes())
    (folder / "cellplm.safetensors").write_bytes(b"not safetensors")
    with pytest.raises(ValueError, match="could not be read as a safetensors file"):
        load_cellplm_checkpoint(folder)
