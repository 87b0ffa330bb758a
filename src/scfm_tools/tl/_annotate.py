"""``sft.tl.annotate``: cell types from a fine-tuned classifier, or from a labelled reference."""

from __future__ import annotations

import inspect
import logging
import time
from numbers import Integral
from typing import TYPE_CHECKING, Any, Literal

import numpy as np

from .._anndata import DEFAULT_CHUNK_SIZE, params_record, resolve_adata, resolve_seed
from .._docs import DOC_CHUNK_SIZE, DOC_COPY, DOC_LAYER, DOC_RANDOM_STATE, doc_params
from .._labels import labels_from_proba, reference_labels
from ._annotate_auto import (
    MODEL_MARGIN,
    N_FOLDS,
    choose_by_validation,
    shared_log_expression,
)
from ._label_transfer import transfer_labels
from ._model_arg import (
    DEFAULT_MODEL,
    LocatedModel,
    call_model,
    cell_embeddings,
    check_model_values,
    lightning_accelerator,
    load_for,
    locate_model,
    prepare_device,
    unavailable,
)

if TYPE_CHECKING:
    import pandas as pd
    import torch
    from anndata import AnnData

    from ..models.base import PretrainedMixin

__all__ = ["annotate"]

logger = logging.getLogger("scfm_tools")

Method = Literal["auto", "expression", "knn", "logreg", "finetune"]
_METHODS = ("auto", "expression", "knn", "logreg", "finetune")
# Methods that read the model's cell embeddings.
_EMBEDDING_METHODS = ("auto", "knn", "logreg")

DOC_ANNOTATE_MODEL = f"""\
model
    The model: a registered name (see :func:`scfm_tools.hub.list_models`), a checkpoint path or
    a model object, or ``None`` for the default model that ships with the package
    (``"{DEFAULT_MODEL}"``). With ``method="knn"`` or ``"logreg"``, any model that embeds
    cells. With ``method="finetune"``, the model to fine-tune (pretrained or fine-tuned, of a
    family whose model class has ``fine_tune_classifier``), which is left as it is: a
    fine-tuned copy does the predicting. Without ``reference``, a fine-tuned classifier: a
    model object with a classifier head (what ``fine_tune_classifier`` returns) or the folder
    or file it was exported to, which records its cell types."""


def _choose_method(method: str | None, located: LocatedModel, reference: Any, model: Any) -> str:
    """Validate ``method`` against the other arguments; ``"classifier"`` means no reference."""
    family = located.family
    can_finetune = hasattr(located.cls, "fine_tune_classifier")
    if method is not None and method not in _METHODS:
        raise ValueError(f"method must be one of {list(_METHODS)} or None, got {method!r}.")
    if reference is None:
        if method is not None:
            raise ValueError(
                f"method={method!r} learns from a labelled reference: pass reference= and "
                "label_key=. Without a reference, model= must be a fine-tuned classifier and "
                "method= is left out."
            )
        if not hasattr(located.cls, "predict_proba"):
            raise ValueError(
                f"a {family} model is not a fine-tuned classifier, so it cannot annotate without "
                "a reference: pass a labelled reference= and label_key= to transfer its cell "
                "types (method='knn' or 'logreg')."
            )
        return "classifier"
    if method is None:
        method = "auto" if model is None else "finetune" if can_finetune else "knn"
    if method == "expression" and model is not None:
        raise ValueError(
            "method='expression' fits a logistic regression on the expression itself and runs "
            "no model: leave model= out, or pick method='knn', 'logreg' or 'finetune'."
        )
    if method == "finetune" and not can_finetune:
        raise NotImplementedError(
            f"method='finetune' cannot fine-tune {family} models: "
            f"{unavailable('fine_tune_classifier', family, 'fine-tuning')} Use method='knn' or "
            f"method='logreg' to transfer the reference's cell types on {family} embeddings."
        )
    return method


def _check_shared_genes(
    model: PretrainedMixin,
    query: AnnData,
    reference: AnnData,
    query_key: str | None,
    reference_key: str | None,
) -> int:
    """Refuse a query and a reference that share too few of the model's genes.

    Each is matched to the model on its own; the labels carry over only through genes both
    have. At least 10 genes and 10% of the smaller side's matched genes must be shared.
    """
    from .._errors import InputError

    sides = []
    for cells, key in ((query, query_key), (reference, reference_key)):
        match = model.match_genes(cells, key)
        sides.append(set(np.asarray(match.index)[match.matched].tolist()))
    shared = len(sides[0] & sides[1])
    smaller = min(len(sides[0]), len(sides[1]))
    if shared < 10 or shared < 0.1 * smaller:
        raise InputError(
            f"the query and the reference share {shared} of the model's genes (query "
            f"{len(sides[0])}, reference {len(sides[1])}): too few for their cell types to "
            "carry over (at least 10 genes and 10% are needed). Check that both name genes the "
            "same way (symbols or Ensembl IDs; gene_key= for a var column) and come from the "
            "same species."
        )
    return shared


def _check_values(
    cells: AnnData, layer: str | None, method: str, located: LocatedModel, chunk_size: int
) -> None:
    """One pass of checks over the values ``method`` reads.

    The ways that read the expression need raw counts, which every family reads too, so for
    them the counts check stands for the model's (``"auto"`` also refuses empty cells, as the
    model's check does); the others get the model's check.
    """
    from .._validation import check_counts, check_nonempty

    if method in ("auto", "expression"):
        check_counts(cells, layer, chunk_size=chunk_size)
        if method == "auto":
            check_nonempty(cells, layer, chunk_size=chunk_size)
    else:
        check_model_values(cells, layer, located, chunk_size=chunk_size, caller="annotate")


def _reference_adata(
    reference: AnnData, label_key: str, layer: str | None, gene_key: str | None
) -> AnnData:
    """Copy what training needs from the reference (counts, labels, obs, gene symbols).

    The caller's reference is never registered or modified. The other ``obs`` columns come
    along for the family's options that name one (e.g. CellPLM's ``batch_key``).
    """
    import anndata as ad
    import pandas as pd

    from .._anndata import get_matrix
    from .._validation import check_counts, check_nonempty

    keep, labels = reference_labels(reference, label_key)
    check_counts(reference, layer)
    check_nonempty(reference, layer)
    names = reference.var_names if gene_key is None else reference.var[gene_key].astype(str)
    X = get_matrix(reference, layer)
    return ad.AnnData(
        X=X[np.flatnonzero(keep)] if not keep.all() else X.copy(),
        obs=reference.obs[keep].assign(**{label_key: pd.Categorical(labels)}),
        var=pd.DataFrame(index=pd.Index(np.asarray(names, dtype=str))),
    )


def _fine_tune(
    loaded: PretrainedMixin,
    located: LocatedModel,
    query: AnnData,
    reference: AnnData,
    *,
    label_key: str,
    layer: str | None,
    reference_layer: str | None,
    gene_key: str | None,
    batch_size: int | None,
    max_epochs: int | None,
    ensemble: int | None,
    random_state: int | None,
    device: torch.device,
    chunk_size: int,
    options: dict[str, Any],
) -> tuple[pd.DataFrame, dict[str, Any]]:
    """Fine-tune copies of ``loaded`` on the reference's cell types; average their predictions.

    The first copy is seeded with ``random_state``, the others with seeds derived from it.
    """
    from ..train import derive_seed  # imports torch and Lightning: not at package import

    seed = resolve_seed(random_state)
    size = int(getattr(located.cls, "fine_tune_ensemble", 1) if ensemble is None else ensemble)
    ref = _reference_adata(reference, label_key, reference_layer, gene_key)
    # the copy names its genes by gene_key already
    shared = _check_shared_genes(loaded, query, ref, gene_key, None)
    located.cls.setup_anndata(ref, labels_key=label_key)
    options = dict(options)
    train_kwargs = dict(options.pop("train_kwargs", None) or {})
    train_kwargs.setdefault("accelerator", lightning_accelerator(device))
    seeds = [seed] + [derive_seed(seed, member) for member in range(1, size)]
    probas, losses = [], []
    for member, member_seed in enumerate(seeds):
        if size > 1:
            logger.info(
                "annotate: fine-tuning copy %d of %d (seed %d)", member + 1, size, member_seed
            )
        # None leaves the family's own fine-tuning defaults (epochs, minibatch) in force.
        classifier, used = call_model(
            loaded.fine_tune_classifier,
            ref,
            label_key,
            task="annotate",
            family=located.family,
            given={"batch_size": batch_size, "max_epochs": max_epochs},
            quiet={"random_state": member_seed},
            options=options,
            train_kwargs=train_kwargs,
        )
        # The cells per forward pass of fine-tuning, where the family has that setting.
        proba, _ = call_model(
            classifier.predict_proba,
            query,
            task="annotate",
            family=located.family,
            given={"batch_size": used.get("batch_size")},
            quiet={"layer": layer, "gene_key": gene_key, "chunk_size": chunk_size},
        )
        probas.append(proba)
        history = getattr(classifier, "history", None) or {}
        if "train_loss" in history:
            losses.append(float(np.asarray(history["train_loss"]).ravel()[-1]))
    # Every copy names the reference's cell types in the same order.
    proba = sum(probas[1:], probas[0]) / size
    # The weighting used: the caller's, else the family's default.
    family_default = inspect.signature(loaded.fine_tune_classifier).parameters.get("class_weights")
    class_weights = options.get(
        "class_weights", None if family_default is None else family_default.default
    )
    params: dict[str, Any] = {
        "random_state": seed,
        "label_key": label_key,
        "n_reference_cells": int(ref.n_obs),
        "max_epochs": used["max_epochs"],
        "batch_size": used.get("batch_size"),
        "class_weights": class_weights if isinstance(class_weights, str | None) else "custom",
        "fine_tuned": "reference",
        "ensemble": size,
        "ensemble_seeds": seeds,
        "n_genes_shared_with_reference": shared,
    }
    if losses:  # the copies' mean
        params["final_train_loss"] = float(np.mean(losses))
    return proba, params


def _transfer(
    loaded: PretrainedMixin,
    located: LocatedModel,
    query: AnnData,
    reference: Any,
    *,
    method: str,
    label_key: str,
    layer: str | None,
    reference_layer: str | None,
    gene_key: str | None,
    n_neighbors: int,
    class_weight: Literal["balanced"] | None,
    batch_size: int | None,
    max_length: int | None,
    random_state: int | None,
    chunk_size: int,
    mod: str | None,
    options: dict[str, Any],
) -> tuple[pd.DataFrame, dict[str, Any], Any]:
    """Carry the reference's labels over to the query cells.

    On the model's embeddings, on the expression, or on whichever of those measures best on
    the reference's cells by cross-validation (``method="auto"``). Also returns the query's
    features the chosen way read (embeddings, or a sparse matrix of expression).
    """
    from anndata import AnnData

    _, ref = resolve_adata(reference, mod=None if isinstance(reference, AnnData) else mod)
    keep, labels = reference_labels(ref, label_key)
    # A view of the labelled cells: nothing of the caller's reference is copied or written.
    ref = ref if keep.all() else ref[keep]
    seed = resolve_seed(random_state)
    params: dict[str, Any] = {}
    features: dict[str, tuple[Any, Any]] = {}
    _check_values(ref, reference_layer, method, located, chunk_size)
    if method != "expression":
        params["n_genes_shared_with_reference"] = _check_shared_genes(
            loaded, query, ref, gene_key, gene_key
        )
    if method in ("auto", "expression"):
        query_x, ref_x, genes = shared_log_expression(
            query,
            ref,
            layer=layer,
            reference_layer=reference_layer,
            gene_key=gene_key,
            chunk_size=chunk_size,
        )
        features["expression"] = (ref_x, query_x)
        # All genes both have (the model paths count only the model's genes).
        params["n_expression_genes_shared_with_reference"] = int(genes.size)
    if method != "expression":

        def embed(cells: AnnData, cells_layer: str | None) -> tuple[np.ndarray, dict[str, Any]]:
            return cell_embeddings(
                loaded,
                cells,
                task="annotate",
                batch_size=batch_size,
                max_length=max_length,
                layer=cells_layer,
                gene_key=gene_key,
                random_state=seed,
                chunk_size=chunk_size,
                options=options,
            )

        query_emb, embed_params = embed(query, layer)
        ref_emb, ref_params = embed(ref, reference_layer)
        params.update(embed_params)
        if "n_genes_matched" in ref_params:
            params["reference_n_genes_matched"] = ref_params["n_genes_matched"]
        features["knn"] = features["logreg"] = (ref_emb, query_emb)

    def fit(name: str, train: Any, predict_on: Any) -> pd.DataFrame:
        ref_features = features[name][0]
        return transfer_labels(
            "logreg" if name == "expression" else name,
            ref_features if train is None else ref_features[train],
            labels if train is None else labels[train],
            predict_on,
            n_neighbors=n_neighbors,
            class_weight=class_weight,
            standardize=name != "expression",
            random_state=seed,
        )

    chosen = method
    if method == "auto":

        def candidate(name: str):
            def predict(train: np.ndarray, validation: np.ndarray) -> np.ndarray:
                proba = fit(name, train, features[name][0][validation])
                return np.asarray(proba.columns)[proba.to_numpy().argmax(axis=1)]

            return predict

        chosen, scores = choose_by_validation(
            {name: candidate(name) for name in ("expression", "knn", "logreg")},
            labels,
            baseline="expression",
            random_state=seed,
        )
        params["selection"] = {"chosen": chosen, "model_margin": MODEL_MARGIN}
        if scores is not None:
            params["selection"].update(cross_validated_macro_f1=scores, n_folds=N_FOLDS)
        logger.info(
            "annotate (auto): cross-validated macro-F1 on the reference %s -> %s",
            "not measured" if scores is None else {k: round(v, 3) for k, v in scores.items()},
            chosen,
        )
    proba = fit(chosen, None, features[chosen][1])
    params.update(
        {
            "label_key": label_key,
            "reference_layer": reference_layer,
            "n_reference_cells": int(ref.n_obs),
            "n_neighbors": min(n_neighbors, int(ref.n_obs)) if chosen == "knn" else None,
            "class_weight": class_weight,
        }
    )
    return proba.set_axis(query.obs_names.copy(), axis=0), params, features[chosen][1]


def _majority_voting(
    ad: AnnData,
    labels: np.ndarray,
    over_clustering: str | None,
    min_prop: float,
    features: Any,
    embed: Any,
    random_state: int | None,
) -> tuple[dict[str, Any], dict[str, Any]]:
    """Vote in the given clusters, or in Leiden over-clusters of ``features``.

    ``features``: what the chosen way read (``None``: fine-tuned models, then ``embed()`` gives
    the model's embedding of the query; sparse: expression, reduced to 50 principal components).
    """
    import pandas as pd
    from scipy import sparse

    from ._majority_voting import majority_vote, over_cluster

    seed = resolve_seed(random_state)
    if over_clustering is not None:
        clusters = ad.obs[over_clustering].to_numpy(dtype=object)
        source = f"obs[{over_clustering!r}]"
    else:
        if features is None:
            features, source = embed(), "Leiden on the model's embedding"
        elif sparse.issparse(features):
            from scanpy.pp import pca

            n_comps = max(1, min(50, features.shape[0] - 1, features.shape[1] - 1))
            features = pca(features.astype(np.float32), n_comps=n_comps, random_state=seed)
            source = f"Leiden on {n_comps} principal components of the log-normalised expression"
        else:
            source = "Leiden on the model's embedding"
        clusters = over_cluster(features, random_state=seed)
    voted = majority_vote(labels, clusters, min_prop=min_prop)
    record = {
        "over_clustering": source,
        "n_clusters": int(pd.Series(clusters).nunique(dropna=False)),
        "min_prop": float(min_prop),
    }
    columns = {
        "majority_voting": voted,
        "over_clustering": pd.Categorical(clusters.astype(str))
        if over_clustering is None
        else None,
    }
    return columns, record


def _write_to_mudata(obj: Any, ad: AnnData, mod: str | None, key: str) -> None:
    """Put the labels where muon users look: ``mdata.obs["<mod>:<key>_label"]``, as update()."""
    mod = "rna" if mod is None else mod
    for column in (f"{key}_label", f"{key}_score", f"{key}_majority_voting"):
        if column in ad.obs.columns:
            obj.obs[f"{mod}:{column}"] = ad.obs[column].reindex(obj.obs_names)
    if obj.n_obs == ad.n_obs and (obj.obs_names == ad.obs_names).all():
        obj.obsm[f"{key}_proba"] = ad.obsm[f"{key}_proba"]


@doc_params(
    model=DOC_ANNOTATE_MODEL,
    layer=DOC_LAYER,
    random_state=DOC_RANDOM_STATE,
    chunk_size=DOC_CHUNK_SIZE,
    copy=DOC_COPY,
)
def annotate(
    adata: AnnData,
    model: Any = None,
    *,
    reference: AnnData | None = None,
    label_key: str | None = None,
    method: Method | None = None,
    n_neighbors: int | None = None,
    class_weight: Literal["balanced"] | None = None,
    layer: str | None = None,
    reference_layer: str | None = None,
    gene_key: str | None = None,
    key_added: str | None = None,
    threshold: float | None = None,
    majority_voting: bool = False,
    over_clustering: str | None = None,
    min_prop: float = 0.0,
    batch_size: int | None = None,
    max_length: int | None = None,
    max_epochs: int | None = None,
    ensemble: int | None = None,
    random_state: int | None = 0,
    device: str | None = None,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    mod: str | None = None,
    copy: bool = False,
    **model_kwargs: Any,
) -> AnnData | None:
    """Annotate cell types with a foundation model.

    Five ways, by ``method``:

    - ``"auto"`` (the default with a ``reference`` and ``model=None``): measures the three
      ways below that need no training of the model (``"expression"``, and ``"knn"`` and
      ``"logreg"`` on the default model's embeddings) by stratified 5-fold cross-validation on
      the labelled reference, takes the one with the best macro-F1, and fits it on the whole
      reference. A model path is taken only when it beats ``"expression"`` by more than 0.02:
      a zero-shot embedding can lose to the plain expression on cells from another batch. With
      a cell type of fewer than 5 reference cells there are no folds, and ``"expression"`` is
      used. What was measured and chosen is recorded in ``uns[key]["params"]["selection"]``.
    - ``"expression"``: a multinomial logistic regression on the log-normalised expression
      (counts per 10,000, ``log1p``) of the genes the query and the reference share, as
      CellTypist fits; no foundation model runs. The baseline every model path is held to.
    - ``"knn"`` (the default with a given ``model`` that cannot be fine-tuned): the query and
      the labelled reference are embedded with the
      same model (as :func:`~scfm_tools.tl.embed_cells`, genes matched per AnnData), and each
      query cell takes the labels of its ``n_neighbors`` nearest reference cells (exact cosine
      search), each vote weighted by ``1 / distance``; the score is the winner's share of the
      votes.
    - ``"logreg"``: a multinomial logistic regression (scikit-learn, on the reference
      embeddings standardised per dimension) predicts each query cell; the score is its highest
      probability.
    - ``"finetune"`` (the default with a reference and a model whose family can be
      fine-tuned): a copy of the model gets a new classifier head for the reference's cell
      types and is fine-tuned with its family's published recipe (the model class's
      ``fine_tune_classifier``: which parts train, learning rate, class weights, early stopping
      on a validation part of the reference), then predicts.

    Without a reference, ``model`` must be a fine-tuned classifier; each cell gets its most
    probable cell type. Cells whose score is below ``threshold`` are labelled
    ``"Unassigned"`` (scBERT's novel-cell-type option; its published threshold is 0.5). The
    reference may come from another batch or protocol than the query; how well its labels
    carry over depends on how well the model's embedding mixes the two.

    Genes are matched to the model's by symbol (or ``gene_key``), in the query and in the
    reference separately. The values are checked as :func:`~scfm_tools.tl.embed_cells` does
    (raw counts; scGPT also takes log-normalised values, with a warning). Fine-tuning runs
    through Lightning on ``device`` (a GPU when there is one with ``"auto"``); on CPU it is only
    practical for small models.

    Parameters
    ----------
    adata
        Cells x genes raw counts to annotate. A :class:`mudata.MuData` is accepted with ``mod=``.
    {model}
    reference
        Labelled cells (raw counts) whose cell types are transferred; an AnnData (or a MuData,
        whose modality ``mod`` is used). It is never modified.
    label_key
        Column of ``reference.obs`` with the cell types (needed with ``reference``); cells
        without a label (NaN) are left out.
    method
        ``"auto"``, ``"expression"``, ``"knn"``, ``"logreg"`` or ``"finetune"`` (see above);
        ``None`` picks ``"auto"`` without a model, ``"finetune"`` for a given model that can be
        fine-tuned and ``"knn"`` for another given model. Leave it out without a reference.
    n_neighbors
        Reference cells voting for each query cell (``method="knn"`` only; default 15, at most
        the number of labelled reference cells).
    class_weight
        ``"balanced"`` weighs each cell type by the inverse of its frequency in the reference
        (``method="logreg"`` only); ``None``: every cell counts the same. For fine-tuning,
        see the family's ``class_weights`` option below.
    {layer}
    reference_layer
        Layer of ``reference`` with its counts; ``None`` reads ``reference.X``.
    gene_key
        Column of ``var`` (of ``adata`` and ``reference``) with gene symbols; ``None`` uses
        ``var_names``.
    key_added
        Prefix of the keys written; default ``"annotate"`` for ``"auto"`` and ``"expression"``,
        else the model family (e.g. ``"scgpt"``, ``"scbert"``).
    threshold
        Score below which a cell is ``"Unassigned"``; ``None`` labels every cell.
    majority_voting
        Refine the labels as CellTypist does: over-cluster the query and give every cell of a
        cluster the label most of its cells got, in ``obs["<key>_majority_voting"]`` (the
        per-cell labels stay in ``obs["<key>_label"]``).
    over_clustering
        Column of ``adata.obs`` with the clusters to vote in (``majority_voting`` only);
        ``None``: Leiden over-clusters (CellTypist's resolution for the number of cells) of
        the cosine neighbour graph of what the annotation read: the model's embedding of the
        query, or for ``"expression"`` the first 50 principal components of its log-normalised
        expression; written to ``obs["<key>_over_clustering"]``.
    min_prop
        Share of its cluster's cells the top label must hold (``majority_voting`` only); below
        it the cluster is ``"Heterogeneous"``.
    batch_size
        Cells per forward pass (and per training minibatch); ``None``: the family's default
        for fine-tuning and prediction (scBERT: 8, the official value) and for embedding
        (knn, logreg), as in :func:`~scfm_tools.tl.embed_cells` (CellPLM refuses it).
    max_length
        Most genes per cell when embedding (``method="auto"``, ``"knn"`` or ``"logreg"``), as in
        :func:`~scfm_tools.tl.embed_cells`; ``None`` uses the checkpoint's.
    max_epochs
        Most fine-tuning epochs over the reference (``method="finetune"``); ``None``: the
        family's default (scBERT: 10).
    ensemble
        Copies fine-tuned (``method="finetune"``), each from its own seed (``random_state``,
        then seeds derived from it), whose probabilities are averaged: the labels then depend
        less on one run's head initialisation, validation split and data order. ``None``: the
        family's default (the model class's ``fine_tune_ensemble``: 3 for scGPT and
        scFoundation, whose shipped defaults' results across protocols varied by seed, else
        1). Time grows with it.
    {random_state}
    device
        ``"cpu"``, ``"cuda"``, ``"auto"``...; ``None`` uses ``sft.settings.device``.
    {chunk_size}
    mod
        Modality of a MuData (default ``"rna"``).
    {copy}
    **model_kwargs
        Options of the model family; an option the family does not take is refused. With
        ``"knn"`` or ``"logreg"``, the family's embedding options (see
        :func:`~scfm_tools.tl.embed_cells`, e.g. CellPLM's ``batch_key``). With fine-tuning,
        the options of the family's ``fine_tune_classifier``, e.g. ``class_weights`` (scBERT's
        default ``"official"``: ``(1 - n_c / N)^2`` per cell type; ``"balanced"``; explicit
        weights; or ``None``), CellPLM's ``batch_key`` (a column of the reference and the
        query) and ``train_kwargs`` (passed to the model's ``train``, e.g.
        ``{{"plan_kwargs": {{"lr": 1e-4}}, "accumulate_grad_batches": 60}}``).

    Returns
    -------
    ``None``, or the modified copy with ``copy=True``. Writes

    - ``adata.obs["<key>_label"]``: the cell type (categorical; ``"Unassigned"`` below
      ``threshold``);
    - ``adata.obs["<key>_score"]``: its score (float32): the kNN vote share or the class
      probability;
    - ``adata.obsm["<key>_proba"]``: the scores of every cell type (DataFrame, cells x types,
      rows summing to 1);
    - with ``majority_voting``: ``adata.obs["<key>_majority_voting"]`` (categorical) and, when
      the clusters were made here, ``adata.obs["<key>_over_clustering"]``;
    - ``adata.uns["<key>"]["params"]``: method, model, family, weights sha256, threshold,
      classes, ``label_key``, reference size, ``n_neighbors`` or ``class_weight``, genes
      matched, training settings (``ensemble``: copies averaged, ``ensemble_seeds``),
      ``selection`` (``"auto"``: the chosen way, the cross-validated macro-F1 of each),
      package version.

    For a MuData, the label and score also go to ``mdata.obs["<mod>:<key>_label"]`` and
    ``["<mod>:<key>_score"]`` (as ``mdata.update()`` names them), and the scores to
    ``mdata.obsm["<key>_proba"]`` when the modality holds all of the MuData's cells.

    Raises
    ------
    InputError
        Non-count values, empty cells, duplicated gene names, too little gene overlap, or a
        reference without the ``label_key`` column or with fewer than two cell types.
    NotImplementedError
        ``method="finetune"`` with a family that cannot be fine-tuned for annotation.
    """
    if batch_size is not None and batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}.")
    if threshold is not None and not 0.0 <= float(threshold) <= 1.0:
        raise ValueError(f"threshold must lie in [0, 1] or be None, got {threshold!r}.")
    if reference is not None and label_key is None:
        raise ValueError("reference= needs label_key=, the reference's obs column of cell types.")
    if n_neighbors is not None and (isinstance(n_neighbors, bool) or int(n_neighbors) < 1):
        raise ValueError(f"n_neighbors must be a positive integer, got {n_neighbors!r}.")
    if class_weight not in (None, "balanced"):
        raise ValueError(f"class_weight must be 'balanced' or None, got {class_weight!r}.")
    if not majority_voting and (over_clustering is not None or min_prop != 0.0):
        raise ValueError("over_clustering= and min_prop= apply to majority_voting=True only.")
    if not 0.0 <= float(min_prop) <= 1.0:
        raise ValueError(f"min_prop must lie in [0, 1], got {min_prop!r}.")
    if ensemble is not None and (
        isinstance(ensemble, bool) or not isinstance(ensemble, Integral) or ensemble < 1
    ):
        raise ValueError(f"ensemble must be a positive integer or None, got {ensemble!r}.")
    obj, ad = resolve_adata(adata, copy=copy, mod=mod)
    if over_clustering is not None and over_clustering not in ad.obs.columns:
        from .._errors import InputError

        raise InputError(
            f"over_clustering={over_clustering!r} is not a column of adata.obs (columns: "
            f"{list(ad.obs.columns)}); name the column with the query's clusters, or leave it "
            "out to over-cluster here."
        )
    located = locate_model(model)
    family = located.family
    chosen = _choose_method(method, located, reference, model)
    for name, value, owner in (
        ("n_neighbors", n_neighbors, "knn"),
        ("class_weight", class_weight, "logreg"),
        ("ensemble", ensemble, "finetune"),
    ):
        if value is not None and chosen != owner:
            raise ValueError(f"{name}= applies to method={owner!r}, not to {chosen!r}.")
    if max_length is not None and chosen not in _EMBEDDING_METHODS:
        raise ValueError(
            "max_length= applies to method='auto', 'knn' or 'logreg' (embedding), not to "
            f"{chosen!r}."
        )
    if chosen == "expression" and model_kwargs:
        raise ValueError(
            f"method='expression' runs no model, so model options {sorted(model_kwargs)} do not "
            "apply."
        )
    batch = None if batch_size is None else int(batch_size)
    _check_values(ad, layer, chosen, located, chunk_size)
    task = "get_latent_representation" if chosen in _EMBEDDING_METHODS else "predict_proba"
    loaded, options = (
        (None, {}) if chosen == "expression" else load_for(located, task, model_kwargs)
    )
    if reference is not None and method is None and getattr(loaded, "classes", None) is not None:
        raise ValueError(
            f"{loaded.model_name} is a fine-tuned classifier (cell types "
            f"{list(loaded.classes)[:5]}...) and a reference was given: that is ambiguous. Drop "
            "reference= to predict its cell types, or say method='finetune' (fine-tune it anew "
            "on the reference), 'knn' or 'logreg' (transfer the reference's labels on its "
            "embeddings)."
        )
    dev = "cpu" if loaded is None else prepare_device(loaded, device)
    described = {"model": None} if loaded is None else loaded.params()
    started = time.perf_counter()
    query_features = None
    if chosen in ("auto", "expression", "knn", "logreg"):
        proba, run_params, query_features = _transfer(
            loaded,
            located,
            ad,
            reference,
            method=chosen,
            label_key=label_key,
            layer=layer,
            reference_layer=reference_layer,
            gene_key=gene_key,
            n_neighbors=15 if n_neighbors is None else int(n_neighbors),
            class_weight=class_weight,
            batch_size=batch,
            max_length=max_length,
            random_state=random_state,
            chunk_size=chunk_size,
            mod=mod,
            options=options,
        )
        batch = run_params.pop("batch_size", batch)
    elif chosen == "finetune":
        proba, run_params = _fine_tune(
            loaded,
            located,
            ad,
            reference,
            label_key=label_key,
            layer=layer,
            reference_layer=reference_layer,
            gene_key=gene_key,
            batch_size=batch,
            max_epochs=max_epochs,
            ensemble=ensemble,
            random_state=random_state,
            device=dev,
            chunk_size=chunk_size,
            options=options,
        )
        batch = run_params.pop("batch_size", batch)
    else:
        if getattr(loaded, "classes", None) is None:
            raise ValueError(
                f"{loaded.model_name} is a pretrained {family} model (no classifier head), not "
                "a fine-tuned one: pass a labelled reference (reference=, label_key=) to "
                "fine-tune it for annotation first."
            )
        proba, used = call_model(
            loaded.predict_proba,
            ad,
            task="annotate",
            family=family,
            given={"batch_size": batch},
            quiet={"layer": layer, "gene_key": gene_key, "chunk_size": chunk_size},
            options=options,
        )
        batch = used.get("batch_size", batch)
        run_params = {"fine_tuned": "model"}
    if loaded is not None and "n_genes_matched" not in run_params:
        run_params["n_genes_matched"] = int(loaded.match_genes(ad, gene_key).n_matched)
    run_params["classes"] = [str(c) for c in proba.columns]
    prediction = labels_from_proba(proba, threshold)
    voting = None
    if majority_voting:
        voting, run_params["majority_voting"] = _majority_voting(
            ad,
            prediction["label"].to_numpy(dtype=object),
            over_clustering,
            min_prop,
            query_features,
            lambda: cell_embeddings(
                loaded,
                ad,
                task="annotate",
                batch_size=batch_size,
                max_length=None,
                layer=layer,
                gene_key=gene_key,
                random_state=resolve_seed(random_state),
                chunk_size=chunk_size,
                options=options,
            )[0],
            random_state,
        )
    elapsed = time.perf_counter() - started

    # The measured default and the expression path are not one family's annotation.
    key = key_added or ("annotate" if chosen in ("auto", "expression") else family)
    # Positional (not index-aligned) assignment keeps the categories, "Unassigned" included.
    ad.obs[f"{key}_label"] = prediction["label"].array
    ad.obs[f"{key}_score"] = prediction["score"].to_numpy(dtype=np.float32)
    ad.obsm[f"{key}_proba"] = proba.set_axis(ad.obs_names, axis=0)
    if voting is not None:
        ad.obs[f"{key}_majority_voting"] = voting["majority_voting"]
        if over_clustering is None:
            ad.obs[f"{key}_over_clustering"] = voting["over_clustering"]
    ad.uns[key] = {
        "params": params_record(
            method=chosen,
            **described,
            layer=layer,
            gene_key=gene_key,
            threshold=threshold,
            batch_size=batch,
            **run_params,
        )
    }
    if ad is not obj:
        _write_to_mudata(obj, ad, mod, key)
    n_unassigned = int((prediction["label"] == "Unassigned").sum())
    logger.info(
        "annotate (%s): %d cells with %s on %s in %.1f s -> obs[%r], obs[%r]%s",
        chosen,
        ad.n_obs,
        described["model"],
        dev,
        elapsed,
        f"{key}_label",
        f"{key}_score",
        f" ({n_unassigned} Unassigned)" if threshold is not None else "",
    )
    return obj if copy else None
