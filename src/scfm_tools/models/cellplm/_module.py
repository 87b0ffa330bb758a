"""CellPLM as a pure-torch scvi-tools module (no AnnData in this layer).

Weight-compatible with the official ``CellPLM.model.OmicsFormer`` (OmicsML/CellPLM, the
published ``20230926_85M`` configuration): every submodule carries the official attribute
name, so an official state dict loads with :meth:`~torch.nn.Module.load_state_dict`.

Cells are the tokens: one minibatch is one *sequence*, the cells of one sample, and the
Flowformer encoder lets every cell of the sequence attend to every other. The path is

1. **embedder**: ``log1p(counts) @ gene_emb`` (a cell is the sum of its genes' embeddings,
   weighted by log expression), then ``Linear -> ReLU -> Dropout -> norm``;
2. **encoder**: pre-norm Flowformer layers across the cells;
3. **pre-latent norm**: a layer norm;
4. **latent**: a Gaussian-mixture VAE layer; ``q(y|x)`` picks one of ``num_clusters``
   components (Gumbel-softmax), ``q(z|x,y)`` is a Gaussian whose mean is the cell embedding;
5. **decoder**: an MLP with batch (and dataset) embeddings added to its hidden layer, ending in
   a negative-binomial head (gene-wise dispersion).

Fine-tuned for cell-type annotation (the official ``CellTypeAnnotationPipeline``:
``latent_mod='ae'``, ``head_type='annotation'``), the mixture latent is replaced by a plain linear
map (``MergeLatentLayer``, the official ``'ae'`` latent, trained afresh) and the decoder by an
MLP classifier on that latent (:class:`AnnotationHead`), trained with cross-entropy on the
labelled cells of each sequence. The state-dict keys are the official ones
(``latent.layers.1.lat_2lat.0.*``, ``head.mlp.*``).

The official model samples the mixture component even in eval mode (a hard Gumbel-softmax
draw), so its embeddings are random; :meth:`CellPLMModule.inference` offers that (``sample=True``,
drawing from a given generator in the official order, or taking given per-cell draws,
:class:`CellNoise`) and a deterministic mode that takes the most likely component (the default).

Left out, because the published checkpoint does not use them: the other encoders
(transformer, performer, cosformer), the other latent layers (vae, split), domain-specific
batch norm (``dsbn``), the adversarial batch layer (``dar``), covariates injected at the input
(``input_covariate``), and the positional encoder for spatial coordinates (constructed but
unused by the official forward pass; its weights are reported as ignored when loading).
"""

from __future__ import annotations

import math
from typing import Any, Literal, NamedTuple

import torch
import torch.nn.functional as F
from scvi.module.base import BaseModuleClass, LossOutput, auto_move_data
from torch import Tensor, nn

from ...nn import FlowformerEncoder, make_norm
from ...nn._flowformer import NormName

__all__ = ["AnnotationHead", "CellNoise", "CellPLMModule", "MergeLatentLayer", "nb_nll"]

# Keys of the minibatch dict this module reads.
X_KEY = "X"  # input counts of one sequence (masked during pretraining), genes in model order
TARGET_KEY = "X_target"  # unmasked counts (the reconstruction target); defaults to X
INPUT_MASK_KEY = "input_mask"  # 1 where a count was masked out of the input
GENE_MASK_KEY = "gene_mask"  # genes measured in this sequence's dataset
BATCH_KEY = "batch"  # decoder batch covariate (ids into the checkpoint's batch table)
DATASET_KEY = "dataset"  # decoder dataset covariate
LABEL_KEY = "label"  # class code of each cell (annotation head)
LOSS_MASK_KEY = "loss_mask"  # cells whose label counts in the loss (the rest are context)

# Width of the hidden layer of q(z|x,y) and of the NB head: fixed in the official code.
QZYX_HIDDEN = 512
NB_HIDDEN = 128
_GUMBEL_EPS = 1e-20
_VAR_EPS = 1e-10
_LOG_EPS = 1e-8
_NO_MIXTURE = (
    "this CellPLM model's latent is the deterministic linear one of a model fine-tuned for "
    "annotation (latent_mod='ae'): it has no mixture component to draw; use sample=False."
)


# Above this share of non-zero counts, dense products of row blocks beat torch's sparse kernel
# (memory-bound: one embedding row read per count). Measured on CPU, 2,000 cells x 19,374
# genes, 1,024 wide: 30% non-zero (deep plate-based cells) 0.78 s dense vs 3.30 s sparse, 7%
# (10x PBMCs) 0.91 vs 0.96 s, 2% 0.87 vs 0.29 s.
DENSE_FROM = 0.1
# Cells per densified block (~20 MB at 19,374 genes): temporaries this small are reused by the
# allocator, where whole-sequence ones are fresh memory (page faults) on every sequence.
DENSE_ROWS = 256


def _log1p_matmul_by_blocks(x: Tensor, weight: Tensor) -> Tensor:
    """``log1p(x) @ weight`` for a sparse COO ``x``, densifying ``DENSE_ROWS`` rows at a time."""
    x = x.coalesce()  # row-major indices, so each block's entries are one contiguous slice
    index, values = x.indices(), torch.log1p(x.values().float())
    n, g = x.shape
    starts = torch.arange(0, n + DENSE_ROWS, DENSE_ROWS, device=x.device).clamp_max(n)
    bounds = torch.searchsorted(index[0], starts).tolist()
    blocks = []
    for k, first in enumerate(range(0, n, DENSE_ROWS)):
        lo, hi = bounds[k], bounds[k + 1]
        dense = torch.zeros(min(DENSE_ROWS, n - first), g, device=x.device, dtype=weight.dtype)
        dense[index[0, lo:hi] - first, index[1, lo:hi]] = values[lo:hi].to(weight.dtype)
        blocks.append(dense @ weight)
    return torch.cat(blocks) if blocks else weight.new_zeros(0, weight.shape[1])


class GeneEmbedder(nn.Module):
    """Gene-embedding table (official ``OmicsEmbedder``): ``feat = log1p(x) @ emb``."""

    def __init__(self, n_genes: int, dim: int) -> None:
        super().__init__()
        self.emb = nn.Parameter(torch.randn(n_genes, dim) * 0.005)

    def forward(self, x: Tensor) -> Tensor:
        if x.layout == torch.sparse_coo and x._nnz() >= DENSE_FROM * x.shape[0] * x.shape[1]:
            return _log1p_matmul_by_blocks(x, self.emb)
        if x.is_sparse or x.layout == torch.sparse_csr:
            return torch.sparse.mm(torch.log1p(x.float()), self.emb)
        if x.shape[0] <= DENSE_ROWS:
            return torch.log1p(x.float()) @ self.emb
        # a row block at a time: no second whole-sequence tensor of log1p values
        return torch.cat([torch.log1p(rows.float()) @ self.emb for rows in x.split(DENSE_ROWS)])


class OmicsEmbeddingLayer(nn.Module):
    """Expression embedder: gene-weighted sum, then ``Linear -> ReLU -> Dropout -> norm``."""

    def __init__(self, n_genes: int, dim: int, dropout: float, norm: NormName) -> None:
        super().__init__()
        self.feat_enc = GeneEmbedder(n_genes, dim)
        self.extra_linear = nn.Sequential(
            nn.Linear(dim, dim), nn.ReLU(), nn.Dropout(dropout), make_norm(norm, dim)
        )

    def forward(self, x: Tensor) -> Tensor:
        return self.extra_linear(self.feat_enc(x))


class PreLatentNorm(nn.Module):
    """Layer norm before the latent layer (official ``PreLatentNorm('ln')``)."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.norm(x)


class _Logits(nn.Module):
    def __init__(self, dim: int, n_clusters: int) -> None:
        super().__init__()
        self.logits = nn.Linear(dim, n_clusters)


class _Gaussian(nn.Module):
    def __init__(self, dim: int, latent_dim: int) -> None:
        super().__init__()
        self.mu = nn.Linear(dim, latent_dim)
        self.var = nn.Linear(dim, latent_dim)

    def forward(self, h: Tensor) -> tuple[Tensor, Tensor]:
        return self.mu(h), F.softplus(self.var(h))


class InferenceNet(nn.Module):
    """``q(y|x)`` (logits over components), ``q(z|x,y)`` (Gaussian) and the prior ``p(z|y)``."""

    def __init__(self, dim: int, latent_dim: int, n_clusters: int) -> None:
        super().__init__()
        self.inference_qyx = nn.ModuleList([_Logits(dim, n_clusters)])
        self.inference_qzyx = nn.ModuleList(
            [
                nn.Linear(dim + n_clusters, QZYX_HIDDEN),
                nn.ReLU(),
                _Gaussian(QZYX_HIDDEN, latent_dim),
            ]
        )
        self.y_mu = nn.Linear(n_clusters, latent_dim)
        self.y_var = nn.Linear(n_clusters, latent_dim)

    def logits(self, x: Tensor) -> Tensor:
        return self.inference_qyx[0].logits(x)

    def qzxy(self, x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
        linear, act, gaussian = self.inference_qzyx
        return gaussian(act(linear(torch.cat([x, y], dim=1))))

    def pzy(self, y: Tensor) -> tuple[Tensor, Tensor]:
        return self.y_mu(y), F.softplus(self.y_var(y))


class CellNoise(NamedTuple):
    """The latent layer's random draws, given per cell instead of drawn from a generator.

    Row ``i`` belongs to cell ``i`` of the sequence, so draws made per cell (e.g. from a stream
    keyed by the cell, :mod:`scfm_tools._cell_rng`) follow the cell whatever its position.
    """

    uniform: Tensor
    """``(n_cells, n_clusters)`` uniform draws in ``[0, 1)``: the Gumbel noise of the component."""
    normal: Tensor
    """``(n_cells, latent_dim)`` standard normal draws: the noise of the Gaussian sample."""


def _draw(
    kind: str, like: Tensor, generator: torch.Generator | None, given: Tensor | None = None
) -> Tensor:
    """Uniform or normal noise shaped like ``like``: ``given``, or drawn from ``generator``."""
    if given is not None:
        if given.shape != like.shape:
            raise ValueError(
                f"the given {kind} draws have shape {tuple(given.shape)}, expected "
                f"{tuple(like.shape)} (one row per cell)."
            )
        return given.to(device=like.device, dtype=like.dtype)
    draw = torch.rand if kind == "rand" else torch.randn
    if generator is None:
        return draw(like.shape, dtype=like.dtype, device=like.device)
    noise = draw(like.shape, generator=generator, dtype=like.dtype, device=generator.device)
    return noise.to(like.device)


def _log_normal(x: Tensor, mu: Tensor, var: Tensor) -> Tensor:
    var = var + _LOG_EPS
    return -0.5 * torch.sum(math.log(2.0 * math.pi) + torch.log(var) + (x - mu) ** 2 / var, -1)


class GMVAELatentLayer(nn.Module):
    """Gaussian-mixture latent layer (official ``GMVAELatentLayer``).

    Parameters
    ----------
    dim
        Input width (the encoder width).
    latent_dim
        Embedding width.
    n_clusters
        Mixture components.
    lamda
        Free-bits floor of both latent loss terms (official ``lamda``).
    w_li
        Weight of the Gaussian term.
    w_en
        Weight of the categorical term.
    """

    def __init__(
        self,
        dim: int,
        latent_dim: int,
        n_clusters: int,
        *,
        lamda: float = 0.5,
        w_li: float = 1.0,
        w_en: float = 1.0,
    ) -> None:
        super().__init__()
        self.inference = InferenceNet(dim, latent_dim, n_clusters)
        self.n_clusters = n_clusters
        self.lamda = lamda
        self.w_li = w_li
        self.w_en = w_en

    def forward(
        self,
        h: Tensor,
        *,
        mode: str,
        generator: torch.Generator | None = None,
        noise: CellNoise | None = None,
        temperature: float = 1.0,
    ) -> dict[str, Tensor]:
        """Run the latent layer on ``h`` ``(n_cells, dim)``.

        ``mode`` is ``"train"`` (soft Gumbel-softmax ``y``, reparameterised ``z``, as official
        training), ``"sample"`` (hard Gumbel-softmax ``y``, as official eval; draws
        ``rand(n, K)`` then ``randn(n, latent_dim)`` from ``generator``, or takes them from
        ``noise``) or ``"argmax"`` (the most likely component, no randomness). ``z`` is the
        sample in training and the mean otherwise.
        """
        logits = self.inference.logits(h)
        prob = torch.softmax(logits, dim=-1)
        if mode == "argmax":
            y = F.one_hot(logits.argmax(-1), self.n_clusters).to(logits.dtype)
        else:
            u = _draw("rand", logits, generator, None if noise is None else noise.uniform)
            gumbel = -torch.log(-torch.log(u + _GUMBEL_EPS) + _GUMBEL_EPS)
            y = torch.softmax((logits + gumbel) / temperature, dim=-1)
            if mode == "sample":
                hard = F.one_hot(y.argmax(-1), self.n_clusters).to(y.dtype)
                # straight-through estimator, with the official arithmetic
                y = (hard - y).detach() + y
        mean, var = self.inference.qzxy(h, y)
        y_mean, y_var = self.inference.pzy(y)
        out = {
            "logits": logits,
            "prob_cat": prob,
            "categorical": y,
            "mean": mean,
            "var": var,
            "y_mean": y_mean,
            "y_var": y_var,
        }
        if mode == "argmax":
            out["z"] = mean
            out["latent_loss"] = mean.new_zeros(())
            return out
        eps = _draw("randn", var, generator, None if noise is None else noise.normal)
        gaussian = mean + eps * torch.sqrt(var + _VAR_EPS)
        out["gaussian"] = gaussian
        out["z"] = gaussian if mode == "train" else mean
        out["latent_loss"] = self.loss(out)
        return out

    def loss(self, out: dict[str, Tensor]) -> Tensor:
        """ELBO terms of the latent layer, each floored at ``lamda`` (free bits).

        Gaussian: ``E[log q(z|x,y) - log p(z|y)]``; categorical: ``KL(q(y|x) || uniform)``.
        """
        z = out["gaussian"]
        gauss = (
            _log_normal(z, out["mean"], out["var"]) - _log_normal(z, out["y_mean"], out["y_var"])
        ).mean()
        log_q = F.log_softmax(out["logits"], dim=-1)
        kl_uniform = (out["prob_cat"] * log_q).sum(-1).mean() + math.log(self.n_clusters)
        gauss = torch.clamp(gauss, min=self.lamda)
        cat = torch.clamp(kl_uniform, min=self.lamda)
        return self.w_li * gauss + self.w_en * cat


class MergeLatentLayer(nn.Module):
    """The official ``'ae'`` latent (``MergeLatentLayer``): one linear map, no randomness."""

    def __init__(self, dim: int, latent_dim: int) -> None:
        super().__init__()
        self.lat_2lat = nn.Sequential(nn.Linear(dim, latent_dim))

    def forward(self, h: Tensor) -> dict[str, Tensor]:
        """Map ``h`` to the latent; ``mean`` and ``z`` are that map, the loss is zero."""
        z = self.lat_2lat(h)
        return {"mean": z, "z": z, "latent_loss": z.new_zeros(())}


class LatentModel(nn.Module):
    """Holds the latent layer at ``layers.1``, where the official ``LatentModel`` keeps it."""

    def __init__(self, layer: GMVAELatentLayer | MergeLatentLayer) -> None:
        super().__init__()
        # Slot 0 is a parameter-free placeholder in the official model.
        self.layers = nn.ModuleList([nn.Identity(), layer])

    @property
    def gmvae(self) -> GMVAELatentLayer:
        layer = self.layers[1]
        if not isinstance(layer, GMVAELatentLayer):
            raise ValueError(_NO_MIXTURE)
        return layer


class AnnotationHead(nn.Module):
    """The official annotation head: an MLP on the latent, dropout before every linear layer.

    ``n_layers - 1`` hidden layers of width ``hidden_dim`` with ReLU between (the official
    default, ``dec_layers=1``, is one linear layer after dropout).
    """

    def __init__(
        self, in_dim: int, hidden_dim: int, n_classes: int, n_layers: int, dropout: float
    ) -> None:
        super().__init__()
        widths = [in_dim] + [hidden_dim] * (n_layers - 1) + [n_classes]
        layers: list[nn.Module] = []
        for i in range(1, len(widths)):
            # the dropout module stays at p=0 too, so the official key names hold
            layers += [nn.Dropout(dropout), nn.Linear(widths[i - 1], widths[i])]
            if i < len(widths) - 1:
                layers.append(nn.ReLU())
        self.mlp = nn.Sequential(*layers)

    def forward(self, z: Tensor) -> Tensor:
        """Class logits ``(n_cells, n_classes)``."""
        return self.mlp(z)


class NBHead(nn.Module):
    """NB output: ``Linear -> ReLU -> Linear -> exp`` means, gene-wise ``exp`` dispersions."""

    def __init__(self, dim: int, n_genes: int) -> None:
        super().__init__()
        self.dec_1 = nn.Linear(dim, NB_HIDDEN)
        self.dec_mean = nn.Sequential(nn.Linear(NB_HIDDEN, n_genes))
        self.dec_disp = nn.Parameter(torch.randn(n_genes))

    def dispersion(self) -> Tensor:
        """Gene-wise NB dispersions ``(n_genes,)``."""
        return torch.exp(self.dec_disp).clamp(1e-4, 1e4)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        mean = torch.exp(self.dec_mean(F.relu(self.dec_1(x)))).clamp(1e-5, 1e6)
        return mean, self.dispersion().expand(x.shape[0], -1)


class NBMLPDecoder(nn.Module):
    """MLP decoder with covariate embeddings and an NB head (official ``NBMLPDecoder``).

    Each hidden layer is ``Linear -> PReLU -> Dropout -> norm``; for each covariate with a table
    (``batch``, ``dataset``, ``platform``), ``Embedding -> PReLU -> norm`` of the covariate is
    added. A covariate that is not given is replaced by the sum of its table's rows pushed
    through the same layers (the official fallback), which gives a reconstruction free of that
    covariate's effect.
    """

    COVARIATES = ("batch", "dataset", "platform")

    def __init__(
        self,
        in_dim: int,
        hidden_dim: int,
        n_genes: int,
        n_layers: int,
        dropout: float,
        norm: NormName,
        covariate_sizes: dict[str, int],
    ) -> None:
        super().__init__()
        self.covariate_sizes = {c: int(covariate_sizes.get(c, 0)) for c in self.COVARIATES}
        self.layers = nn.ModuleList()
        self.covariate_layers = nn.ModuleList()
        has_covariates = sum(self.covariate_sizes.values()) > 0
        for i in range(n_layers - 1):
            self.layers.append(
                nn.Sequential(
                    nn.Linear(hidden_dim if i else in_dim, hidden_dim),
                    nn.PReLU(),
                    nn.Dropout(dropout),
                    make_norm(norm, hidden_dim),
                )
            )
            if has_covariates:
                self.covariate_layers.append(
                    nn.ModuleDict(
                        {
                            cov: nn.Sequential(
                                nn.Embedding(size, hidden_dim),
                                nn.PReLU(),
                                make_norm(norm, hidden_dim),
                            )
                            for cov, size in self.covariate_sizes.items()
                            if size > 0
                        }
                    )
                )
        self.out_layer = NBHead(hidden_dim if n_layers > 1 else in_dim, n_genes)

    def forward(self, z: Tensor, covariates: dict[str, Tensor | None]) -> dict[str, Tensor]:
        x = z
        for i, layer in enumerate(self.layers):
            x = layer(x)
            if not len(self.covariate_layers):
                continue
            for cov, block in self.covariate_layers[i].items():
                ids = covariates.get(cov)
                if ids is not None:
                    x = x + block(ids.long())
                else:
                    table = block[0].weight.detach().sum(0, keepdim=True)
                    x = x + block[2](block[1](table))
        mean, disp = self.out_layer(x)
        return {"mean": mean, "disp": disp}


def nb_nll(x: Tensor, mean: Tensor, disp: Tensor, eps: float = 1e-10) -> Tensor:
    """Element-wise negative-binomial negative log-likelihood (official ``NBReconstructionLoss``).

    Parameters
    ----------
    x
        Observed counts.
    mean
        NB means.
    disp
        NB dispersions (inverse overdispersion, ``theta``).
    eps
        Numerical floor inside the logs and gammas.

    Returns
    -------
    ``-log NB(x | mean, disp)`` with the same shape as ``x``.
    """
    t1 = torch.lgamma(disp + eps) + torch.lgamma(x + 1.0) - torch.lgamma(x + disp + eps)
    t2 = (disp + x) * torch.log(1.0 + mean / (disp + eps)) + x * (
        torch.log(disp + eps) - torch.log(mean + eps)
    )
    return t1 + t2


class CellPLMModule(BaseModuleClass):
    """The CellPLM cell language model (official ``OmicsFormer``) as a scvi-tools module.

    A minibatch is one sequence of cells, a dict of tensors: ``X`` (counts ``(n_cells,
    n_genes)`` in the model's gene order, dense or torch sparse; during pretraining the masked
    input), and optionally ``X_target`` (the unmasked counts, for :meth:`loss`), ``input_mask``
    (1 where a count was masked), ``gene_mask`` (bool ``(n_genes,)``, genes measured),
    ``batch`` and ``dataset`` (long ``(n_cells,)``, ids into the decoder's covariate tables).

    Parameters
    ----------
    n_genes
        Size of the gene vocabulary (official ``len(gene_list)`` = ``out_dim``).
    enc_hid
        Width of the embedder and encoder (``enc_hid``).
    enc_layers
        Flowformer layers (``enc_layers``).
    enc_heads
        Attention heads (``enc_head``).
    post_latent_dim
        Width of the cell embedding (``post_latent_dim``).
    num_clusters
        Mixture components of the latent layer (``num_clusters``).
    dec_hid
        Width of the decoder's hidden layers (``dec_hid``).
    dec_layers
        Decoder depth; ``dec_layers - 1`` hidden layers (``dec_layers``).
    batch_num
        Rows of the decoder's batch table (``batch_num``; 0 for none).
    dataset_num
        Rows of the decoder's dataset table (``dataset_num``).
    platform_num
        Rows of the decoder's platform table (``platform_num``).
    dropout
        Dropout everywhere (``model_dropout``).
    norm
        Normalisation of the embedder and decoder (``norm``; the published model uses
        group norm with 4 groups). The encoder layers always use layer norm, as the official.
    lamda
        Free-bits floor of the latent loss terms (``lamda``).
    w_li
        Weight of the Gaussian latent term (``w_li``).
    w_en
        Weight of the categorical latent term (``w_en``).
    dae
        Add the masked-entries NB term to the pretraining loss (``dae``).
    latent_mod
        ``"gmvae"`` (the pretrained mixture latent) or ``"ae"`` (a linear latent, as the
        official annotation fine-tuning builds).
    n_classes
        Cell types of an annotation head (official ``head_type='annotation'``, ``out_dim``):
        the head replaces the decoder; ``None``: the NB decoder.
    """

    def __init__(
        self,
        n_genes: int,
        *,
        enc_hid: int = 1024,
        enc_layers: int = 4,
        enc_heads: int = 8,
        post_latent_dim: int = 512,
        num_clusters: int = 16,
        dec_hid: int = 1024,
        dec_layers: int = 2,
        batch_num: int = 0,
        dataset_num: int = 0,
        platform_num: int = 0,
        dropout: float = 0.1,
        norm: NormName = "layernorm",
        lamda: float = 0.5,
        w_li: float = 1.0,
        w_en: float = 1.0,
        dae: bool = True,
        latent_mod: Literal["gmvae", "ae"] = "gmvae",
        n_classes: int | None = None,
    ) -> None:
        super().__init__()
        if n_genes < 1 or dec_layers < 1 or enc_layers < 0:
            raise ValueError(
                f"need n_genes >= 1, dec_layers >= 1 and enc_layers >= 0; got {n_genes}, "
                f"{dec_layers}, {enc_layers}."
            )
        if latent_mod not in ("gmvae", "ae"):
            raise ValueError(f"latent_mod must be 'gmvae' or 'ae', got {latent_mod!r}.")
        if n_classes is not None and int(n_classes) < 2:
            raise ValueError(f"an annotation head needs n_classes >= 2, got {n_classes!r}.")
        self.config: dict[str, Any] = {
            "n_genes": n_genes,
            "enc_hid": enc_hid,
            "enc_layers": enc_layers,
            "enc_heads": enc_heads,
            "post_latent_dim": post_latent_dim,
            "num_clusters": num_clusters,
            "dec_hid": dec_hid,
            "dec_layers": dec_layers,
            "batch_num": batch_num,
            "dataset_num": dataset_num,
            "platform_num": platform_num,
            "dropout": dropout,
            "norm": norm,
            "lamda": lamda,
            "w_li": w_li,
            "w_en": w_en,
            "dae": dae,
            "latent_mod": latent_mod,
            "n_classes": None if n_classes is None else int(n_classes),
        }
        self.n_genes = n_genes
        self.n_latent = post_latent_dim
        self.dae = dae
        #: Per-class weights of the annotation loss (set by the model before training).
        self.class_weights: Tensor | None = None
        self.embedder = OmicsEmbeddingLayer(n_genes, enc_hid, dropout, norm)
        self.encoder = FlowformerEncoder(
            enc_layers, enc_hid, enc_heads, 2 * enc_hid, dropout, norm="layernorm"
        )
        self.pre_latent_norm = PreLatentNorm(enc_hid)
        self.latent = LatentModel(
            GMVAELatentLayer(
                enc_hid, post_latent_dim, num_clusters, lamda=lamda, w_li=w_li, w_en=w_en
            )
            if latent_mod == "gmvae"
            else MergeLatentLayer(enc_hid, post_latent_dim)
        )
        # As the official model: a task head takes the decoder's place.
        self.head = (
            None
            if n_classes is None
            else AnnotationHead(post_latent_dim, dec_hid, int(n_classes), dec_layers, dropout)
        )
        self.decoder = (
            NBMLPDecoder(
                post_latent_dim,
                dec_hid,
                n_genes,
                dec_layers,
                dropout,
                norm,
                {"batch": batch_num, "dataset": dataset_num, "platform": platform_num},
            )
            if self.head is None
            else None
        )

    @property
    def is_classifier(self) -> bool:
        """Whether the module ends in an annotation head (instead of the NB decoder)."""
        return self.head is not None

    # encoder -----------------------------------------------------------------------------------
    def encode(self, x: Tensor) -> dict[str, Tensor]:
        """Embed and encode one sequence of cells.

        Parameters
        ----------
        x
            Counts ``(n_cells, n_genes)``, dense or torch sparse.

        Returns
        -------
        Dict with ``embedder``, ``encoder`` and ``pre_latent`` outputs, each
        ``(n_cells, enc_hid)``.
        """
        h0 = self.embedder(x)
        h1 = self.encoder(h0)
        return {"embedder": h0, "encoder": h1, "pre_latent": self.pre_latent_norm(h1)}

    # scvi-tools module interface ---------------------------------------------------------------
    def _get_inference_input(self, tensors: dict[str, Tensor], **kwargs) -> dict[str, Any]:
        return {"x": tensors[X_KEY]}

    @auto_move_data
    def inference(
        self,
        x: Tensor,
        *,
        sample: bool = False,
        generator: torch.Generator | None = None,
        noise: CellNoise | None = None,
    ) -> dict[str, Tensor]:
        """Encode a sequence and run the latent layer.

        In training mode the official training path runs (soft Gumbel-softmax component,
        reparameterised ``z``). In eval mode ``z`` is the Gaussian mean given the component:
        the most likely one (``sample=False``, deterministic) or a hard Gumbel-softmax draw
        (``sample=True``, the official eval behaviour). The linear latent (``latent_mod="ae"``)
        has no randomness: ``z`` is its output in either mode.

        Parameters
        ----------
        x
            Counts ``(n_cells, n_genes)`` of one sequence.
        sample
            In eval mode, draw the mixture component as the official model does.
        generator
            Source of the random draws (``None``: torch's global generator). With a CPU
            generator seeded ``s``, ``sample=True`` reproduces the official run after
            ``torch.manual_seed(s)``: per call it draws ``rand(n_cells, num_clusters)`` then
            ``randn(n_cells, post_latent_dim)``.
        noise
            Those draws given per cell instead (``generator`` is then not used), so that a
            cell's draws do not depend on its position in the sequence.

        Returns
        -------
        :meth:`encode`'s dict plus the latent layer's outputs: ``logits``, ``prob_cat``,
        ``categorical`` (the component used), ``mean`` and ``var`` of ``q(z|x,y)``,
        ``y_mean``/``y_var`` of the prior, ``z`` (what the decoder gets) and ``latent_loss``.
        """
        out = self.encode(x)
        if self.config["latent_mod"] == "ae":
            if sample:
                raise ValueError(_NO_MIXTURE)
            out.update(self.latent.layers[1](out["pre_latent"]))
            return out
        mode = "train" if self.training else ("sample" if sample else "argmax")
        out.update(
            self.latent.gmvae(out["pre_latent"], mode=mode, generator=generator, noise=noise)
        )
        return out

    def _get_generative_input(
        self, tensors: dict[str, Tensor], inference_outputs: dict[str, Any], **kwargs
    ) -> dict[str, Any]:
        return {
            "z": inference_outputs["z"],
            "batch": tensors.get(BATCH_KEY),
            "dataset": tensors.get(DATASET_KEY),
        }

    @auto_move_data
    def generative(
        self, z: Tensor, batch: Tensor | None = None, dataset: Tensor | None = None
    ) -> dict[str, Tensor]:
        """Decode cell embeddings into NB means and dispersions over the model's genes.

        Parameters
        ----------
        z
            Cell embeddings ``(n_cells, post_latent_dim)``.
        batch
            Batch ids ``(n_cells,)`` into the decoder's batch table; ``None`` decodes without a
            batch effect (the official fallback: the table's rows summed).
        dataset
            Dataset ids, likewise.

        Returns
        -------
        Dict with ``mean`` and ``disp``, each ``(n_cells, n_genes)``; with an annotation head,
        ``logits`` ``(n_cells, n_classes)`` instead (the covariates are not used).
        """
        if self.head is not None:
            return {"logits": self.head(z)}
        for name, ids, size in (
            ("batch", batch, self.config["batch_num"]),
            ("dataset", dataset, self.config["dataset_num"]),
        ):
            if ids is None:
                continue
            if size == 0:
                raise ValueError(f"{name} ids were given, but this decoder has no {name} table.")
            if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= size):
                raise ValueError(
                    f"{name} ids must lie in [0, {size}) (the decoder's {name} table), got "
                    f"[{int(ids.min())}, {int(ids.max())}]."
                )
        return self.decoder(z, {"batch": batch, "dataset": dataset})

    def loss(
        self,
        tensors: dict[str, Tensor],
        inference_outputs: dict[str, Any],
        generative_outputs: dict[str, Tensor],
    ) -> LossOutput:
        """Compute the published pretraining objective: NB reconstruction + latent ELBO terms.

        The NB term (official ``NBReconstructionLoss``) covers the cells with a masked entry
        (all cells when nothing is masked): per cell, the NB negative log-likelihood of its
        counts, with the predicted means rescaled to the cell's library size, summed over the
        measured genes; with ``dae`` (in training), the same on the masked entries alone, with
        means rescaled to their total, is added. The mean over cells is added to the latent
        layer's loss.

        Parameters
        ----------
        tensors
            The minibatch (``X``; ``X_target``, ``input_mask``, ``gene_mask`` when present).
        inference_outputs
            Output of :meth:`inference`.
        generative_outputs
            Output of :meth:`generative`.

        Returns
        -------
        :class:`scvi.module.base.LossOutput` with the total loss, the per-cell NB term as
        ``reconstruction_loss``, the latent term as ``kl_local`` and both in ``extra_metrics``.
        With an annotation head, :meth:`classification_loss` instead.
        """
        if self.head is not None:
            return self.classification_loss(tensors, generative_outputs)
        x = tensors.get(TARGET_KEY, tensors[X_KEY])
        x = (x.to_dense() if x.layout != torch.strided else x).float()
        mean, disp = generative_outputs["mean"], generative_outputs["disp"]
        mask = tensors.get(INPUT_MASK_KEY)
        mask = torch.ones_like(x) if mask is None else mask.to(x.dtype)
        genes = tensors.get(GENE_MASK_KEY)
        if genes is not None:
            genes = genes.bool()
            x, mean, disp, mask = x[:, genes], mean[:, genes], disp[:, genes], mask[:, genes]
        cells = mask.sum(1) > 0
        x, mean, disp, mask = x[cells], mean[cells], disp[cells], mask[cells]

        def scaled(m: Tensor, target: Tensor) -> Tensor:
            return m / m.sum(1, keepdim=True) * target.sum(1, keepdim=True)

        per_entry = nb_nll(x, scaled(mean, x), disp)
        if self.dae and self.training:
            xm, mm = x * mask, mean * mask
            per_entry = per_entry + nb_nll(xm, scaled(mm, xm), disp * mask)
        per_cell = per_entry.sum(-1)
        recon = per_cell.mean() if per_cell.numel() else per_cell.sum()
        latent = inference_outputs["latent_loss"]
        return LossOutput(
            loss=recon + latent,
            reconstruction_loss=per_cell,
            kl_local=latent.detach().expand(per_cell.shape[0]) if per_cell.numel() else None,
            n_obs_minibatch=per_cell.shape[0],
            extra_metrics={"nb_loss": recon.detach(), "latent_loss": latent.detach()},
        )

    def classification_loss(
        self, tensors: dict[str, Tensor], generative_outputs: dict[str, Tensor]
    ) -> LossOutput:
        """Cross-entropy of the annotation head over the labelled cells of a sequence.

        The official ``AnnotationHead`` loss: only the cells of ``loss_mask`` (the training
        cells; the others are context) count, each class weighted by :attr:`class_weights`
        when set.

        Parameters
        ----------
        tensors
            The minibatch: ``label`` (class code per cell) and optionally ``loss_mask``.
        generative_outputs
            Output of :meth:`generative` (``logits``).

        Returns
        -------
        :class:`scvi.module.base.LossOutput` with the mean cross-entropy, the per-cell terms as
        ``reconstruction_loss`` and the number of labelled cells as ``n_obs_minibatch``.
        """
        logits = generative_outputs["logits"]
        mask = tensors.get(LOSS_MASK_KEY)
        keep = (
            torch.ones(logits.shape[0], dtype=torch.bool, device=logits.device)
            if mask is None
            else mask.to(logits.device).bool()
        )
        logits, labels = logits[keep], tensors[LABEL_KEY].to(logits.device).long()[keep]
        weight = None if self.class_weights is None else self.class_weights.to(logits)
        per_cell = F.cross_entropy(logits, labels, weight=weight, reduction="none")
        # torch's (weighted) mean, and zero for a sequence without labelled cells
        total = (
            per_cell.new_tensor(float(labels.numel())) if weight is None else weight[labels].sum()
        )
        ce = per_cell.sum() / total.clamp_min(1e-12)
        return LossOutput(
            loss=ce,
            reconstruction_loss=per_cell,
            n_obs_minibatch=int(labels.numel()),
            extra_metrics={"ce_loss": ce.detach()},
        )

    @torch.no_grad()
    def sample(self, tensors: dict[str, Tensor], n_samples: int = 1) -> Tensor:
        """Draw counts from the NB reconstruction of a sequence (component sampled too).

        Parameters
        ----------
        tensors
            The minibatch (``X`` and optional ``batch``/``dataset`` covariates).
        n_samples
            Draws per cell.

        Returns
        -------
        ``(n_samples, n_cells, n_genes)`` counts (the first axis dropped when ``n_samples=1``).
        """
        from scvi.distributions import NegativeBinomial

        if self.decoder is None:
            raise ValueError("a CellPLM module with an annotation head has no decoder to sample.")
        inf = self.inference(tensors[X_KEY], sample=True)
        gen = self.generative(**self._get_generative_input(tensors, inf))
        out = NegativeBinomial(mu=gen["mean"], theta=gen["disp"]).sample((n_samples,))
        return out[0] if n_samples == 1 else out

    # helpers -----------------------------------------------------------------------------------
    @torch.no_grad()
    def cell_embedding(
        self, x: Tensor, *, sample: bool = False, generator: torch.Generator | None = None
    ) -> Tensor:
        """Cell embeddings (the latent mean) of one sequence, in eval semantics.

        Parameters
        ----------
        x
            Counts ``(n_cells, n_genes)`` of one sequence.
        sample
            Draw the mixture component (official) instead of taking the most likely one.
        generator
            Source of the draws with ``sample=True``.

        Returns
        -------
        ``(n_cells, post_latent_dim)`` float tensor.
        """
        was_training = self.training
        self.eval()
        try:
            return self.inference(x, sample=sample, generator=generator)["mean"]
        finally:
            self.train(was_training)
