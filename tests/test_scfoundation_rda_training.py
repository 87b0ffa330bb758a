"""scFoundation's RDA pretraining learns what inference asks for: predictions at read positions.

Inference (``sft.tl.impute``, the official ``gene_expression`` output) masks nothing, so every
prediction is made at a position whose value the model reads (through the encoder) or at a zero
(the zero embedding). A plan that scores only hidden positions never trains those outputs; the
published dataset config (``replace_prob=0.8``, ``random_token_prob=0.1``) leaves 10% of the
scored values visible and randomises 10%. These tests pin that down on real PBMCs.
"""

from __future__ import annotations

import anndata as ad
import numpy as np
import pytest
import torch

import scfm_tools as sft
from _scfoundation_tiny import TINY as SHARED_TINY
from scfm_tools.models.scfoundation import (
    GeneReindexer,
    SCFoundationModule,
    SCFoundationTrainingPlan,
    corrupt_selected,
    mask_values,
    rda_pairs,
)
from scfm_tools.models.scfoundation._module import HIDDEN, MASK, TARGET, VALUES

PBMC8K = "pbmc8k_200genes_labeled.h5ad"
TINY = {**SHARED_TINY, "bin_num": 10}


@pytest.fixture(scope="module")
def pbmc(data_dir):
    """144 real PBMCs (200 genes, raw counts)."""
    return ad.read_h5ad(data_dir / PBMC8K)[:144].copy()


@pytest.fixture(scope="module")
def pairs(pbmc):
    """RDA input/target sequences of 96 cells."""
    adata = pbmc[:96].copy()
    sft.pp.downsample_rda(adata, min_counts=0, random_state=0)
    values, target, usable = rda_pairs(
        adata.X.toarray(), adata.layers["rda_counts"].toarray(), GeneReindexer(np.arange(200), 200)
    )
    assert usable.all()
    return adata, values, target


def _lognorm(x) -> np.ndarray:
    x = np.asarray(x.toarray() if hasattr(x, "toarray") else x, dtype=np.float64)
    return np.log1p(x / x.sum(axis=1, keepdims=True) * 1e4)


def test_corrupt_selected_published_shares(pairs):
    _, values, _ = pairs
    g = torch.Generator().manual_seed(0)
    selected = mask_values(values, 200, generator=g)
    corrupted, hidden = corrupt_selected(values, selected, 200, generator=g)
    n = int(selected.sum())
    assert n > 1000
    assert not (hidden & ~selected).any()  # only selected positions are hidden
    assert torch.equal(corrupted[~selected], values[~selected])  # the others are untouched
    changed = selected & ~hidden & (corrupted != values)
    unchanged = selected & ~hidden & (corrupted == values)
    assert abs(int(hidden.sum()) / n - 0.8) < 0.03
    assert abs(int(changed.sum()) / n - 0.1) < 0.03
    assert abs(int(unchanged.sum()) / n - 0.1) < 0.03
    # random values are real expression values of the minibatch (never the T/S tokens)
    genes = values[:, :200]
    assert torch.isin(corrupted[changed], genes[genes > 0]).all()
    assert not selected[:, 200:].any() and torch.equal(corrupted[:, 200:], values[:, 200:])
    # replace_prob=1 hides every selected value, as the plan did before
    corrupted, hidden = corrupt_selected(values, selected, 200, replace_prob=1.0,
                                         random_token_prob=0.0)  # fmt: skip
    assert torch.equal(hidden, selected) and torch.equal(corrupted, values)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"replace_prob": 1.2}, "replace_prob must lie in"),
        ({"random_token_prob": -0.1}, "random_token_prob must lie in"),
        ({"replace_prob": 0.8, "random_token_prob": 0.3}, "at most 1"),
    ],
)
def test_corrupt_selected_refuses_bad_shares(pairs, kwargs, match):
    _, values, _ = pairs
    before = values.clone()
    selected = mask_values(values, 200, generator=torch.Generator().manual_seed(0))
    with pytest.raises(ValueError, match=match):
        corrupt_selected(values, selected, 200, **kwargs)
    with pytest.raises(ValueError, match=match):
        SCFoundationTrainingPlan(SCFoundationModule(200, **TINY), gene_index=np.arange(200),
                                 **kwargs)  # fmt: skip
    assert torch.equal(values, before)


def test_training_batch_scores_positions_the_encoder_reads(pairs):
    """The regression: the plan hid every scored position, so no read position was trained."""
    adata, _, _ = pairs
    module = SCFoundationModule(200, **TINY)
    plan = SCFoundationTrainingPlan(module, gene_index=np.arange(200), random_state=0)
    batch = {
        "X": torch.from_numpy(adata.X[:32].toarray().astype(np.float32)),
        "rda_X": torch.from_numpy(adata.layers["rda_counts"][:32].toarray().astype(np.float32)),
    }
    out = plan.on_before_batch_transfer(batch, 0)
    scored, hidden, values = out[MASK], out[HIDDEN], out[VALUES]
    visible = scored & ~hidden
    assert int(visible.sum()) > 0.1 * int(scored.sum())
    # the encoder reads the visible scored values that are non-zero, and none of the hidden ones
    enc = module.inference(**module._get_inference_input(out))
    read = torch.zeros_like(scored)
    rows = torch.arange(values.shape[0]).unsqueeze(1).expand_as(enc["positions"])
    keep = ~enc["padding"]
    read[rows[keep], enc["positions"][keep]] = True
    assert not (read & hidden).any()
    assert torch.equal(read & visible, visible & (values > 0))
    assert int((read & visible).sum()) > 50
    # and the loss is taken at all scored positions, visible ones included
    gen = module.generative(**module._get_generative_input(out, enc))
    loss = module.loss(out, enc, gen).loss
    pred, target = gen["expression"], out[TARGET]
    expected = ((pred - target).square() * scored).sum() / scored.sum()
    torch.testing.assert_close(loss, expected)


def test_plan_uses_adam_epsilon_of_transformers():
    plan = SCFoundationTrainingPlan(SCFoundationModule(200, **TINY), gene_index=np.arange(200))
    optimizer = plan.configure_optimizers()
    optimizer = optimizer["optimizer"] if isinstance(optimizer, dict) else optimizer
    assert optimizer.param_groups[0]["eps"] == 1e-8


@pytest.mark.slow
def test_rda_training_learns_to_impute_shallow_cells(pbmc):
    """Trained on 96 cells, the model's output for 48 other, 4x thinned cells follows them.

    Before the fix (every scored position hidden, Adam eps 0.01) the per-cell correlation of
    the prediction with the full-depth truth was about 0 (-0.2 to 0.1 over seeds); it is about
    0.4 now.
    """
    fit = pbmc[:96].copy()
    sft.pp.downsample_rda(fit, min_counts=0, random_state=0)
    sft.models.SCFoundation.setup_anndata(fit, rda_layer="rda_counts")
    torch.manual_seed(0)
    model = sft.models.SCFoundation(fit, **TINY)
    model.train(max_epochs=8, accelerator="cpu", batch_size=16, train_size=1.0, random_state=0,
                plan_kwargs={"lr": 1e-2}, enable_progress_bar=False)  # fmt: skip
    held = pbmc[96:144].copy()
    sft.pp.downsample_rda(held, rate=0.25, min_counts=0, random_state=1)
    shallow = ad.AnnData(held.layers["rda_counts"].copy(), obs=held.obs[[]], var=held.var[[]])
    shallow.layers["rda_counts"] = shallow.X.copy()
    pred = np.maximum(model.get_gene_expression(shallow, target_depth="f4"), 0.0)
    truth = _lognorm(held.X)
    r = [np.corrcoef(p, t)[0, 1] for p, t in zip(pred, truth, strict=True)]
    assert np.mean(r) > 0.25
    assert (held.X != pbmc[96:144].X).nnz == 0
