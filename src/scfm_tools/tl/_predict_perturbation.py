"""``sft.tl.predict_perturbation``: predict the expression after perturbing genes."""

from __future__ import annotations

import inspect
import logging
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import pandas as pd

from .._anndata import DEFAULT_CHUNK_SIZE, params_record, resolve_adata, resolve_seed
from .._docs import DOC_CHUNK_SIZE, DOC_LAYER, DOC_RANDOM_STATE, doc_params
from .._validation import InputError, check_counts, check_unique_names
from ._embed_genes import compute_gene_embeddings
from ._model_arg import DEFAULT_MODEL, LocatedModel, load_for, locate_model, unavailable

if TYPE_CHECKING:
    from anndata import AnnData

    from ..models.perturbation import PerturbationData, PerturbationPredictor

__all__ = ["predict_perturbation"]

logger = logging.getLogger("scfm_tools")

Method = Literal["control", "mean", "additive", "linear", "gears", "finetune"]
_BASELINES = ("control", "mean", "additive")
_EMBEDDING_METHODS = ("linear", "gears")
METHODS = (*_BASELINES, *_EMBEDDING_METHODS, "finetune")
#: ``method=None``: the method that scored best on held-out perturbations
#: (benchmarks/results/perturbation.md).
DEFAULT_METHOD = "additive"
KEY = "predict_perturbation"


def _names(perturbations: Sequence[str] | str) -> list[str]:
    if isinstance(perturbations, str):
        perturbations = [perturbations]
    names = [str(p) for p in perturbations]
    if not names:
        raise ValueError("perturbations is empty: name at least one perturbation to predict.")
    unique = list(dict.fromkeys(names))
    if len(unique) < len(names):
        logger.info(
            "predict_perturbation: %d repeated name(s) predicted once", len(names) - len(unique)
        )
    return unique


def _check_input(adata: AnnData, perturbation_key: str, control: str, layer, chunk_size) -> None:
    if perturbation_key not in adata.obs:
        raise KeyError(
            f"adata.obs has no column {perturbation_key!r}; pass perturbation_key= naming the "
            f"column with each cell's perturbation (present: {list(adata.obs.columns)})."
        )
    labels = set(adata.obs[perturbation_key].astype(str))
    if control not in labels:
        shown = sorted(labels)[:8]
        raise InputError(
            f"no cell of adata has {perturbation_key} == {control!r}: the control cells are "
            f"needed (effects are learnt against them). Pass control= naming them; values seen: "
            f"{shown}{' ...' if len(labels) > 8 else ''}."
        )
    check_unique_names(adata.var_names)
    # The predictions are log-normalised here, from counts; normalised input would be normalised
    # twice.
    check_counts(adata, layer, chunk_size=chunk_size)


def _embedder(located: LocatedModel, readout: np.ndarray):
    """Gene -> embedding rows from the model's gene tokens (``embed_genes``, token mode)."""
    from anndata import AnnData

    def embed(genes: Sequence[str]) -> np.ndarray:
        # The read-out genes come along so that the vocabulary-overlap check sees a real gene set.
        names = list(dict.fromkeys([*genes, *map(str, readout)]))
        result, _ = compute_gene_embeddings(
            AnnData(var=pd.DataFrame(index=names)), located, caller="predict_perturbation"
        )
        return result.embeddings[: len(genes)]

    return embed


def _build(
    method: str,
    model: Any,
    data: PerturbationData,
    *,
    max_epochs: int | None,
    random_state: int,
    device: str | None,
    options: dict[str, Any],
) -> tuple[PerturbationPredictor, dict[str, Any]]:
    """Return the unfitted predictor of ``method`` and what to record about its model."""
    from ..models import perturbation as pert

    if method in _BASELINES:
        if model is not None:
            raise ValueError(
                f"method={method!r} is a baseline that reads no model; leave model=None, or "
                "choose method='linear', 'gears' or 'finetune' to use one."
            )
        if max_epochs is not None:
            raise ValueError(
                f"max_epochs does not apply to method={method!r} (nothing is trained)."
            )
        cls = {
            "control": pert.ControlPredictor,
            "mean": pert.MeanPredictor,
            "additive": pert.AdditivePredictor,
        }[method]
        return _construct(cls, method, options), {}
    from .._settings import settings

    located = locate_model(model)
    trained = {"random_state": random_state, "device": settings.resolve_device(device)}
    if max_epochs is not None:
        trained["max_epochs"] = max_epochs
    if method == "finetune":
        if not hasattr(located.cls, "perturbation_predictor_cls"):
            raise NotImplementedError(
                unavailable("perturbation_predictor_cls", located.family, "method='finetune'")
            )
        loaded, _ = load_for(located, "perturbation_predictor_cls", {})
        cls = loaded.perturbation_predictor_cls
        return _construct(cls, method, options, model=loaded, **trained), loaded.params()
    embed = _embedder(located, data.genes)
    record = located.params()
    source = str(record.get("model", located.family))
    if method == "linear":
        if max_epochs is not None:
            raise ValueError("max_epochs does not apply to method='linear' (a closed-form fit).")
        return _construct(
            pert.LinearPredictor, method, options, embed=embed, embedding_source=source
        ), record
    return _construct(
        pert.GearsPredictor, method, options, embed=embed, embedding_source=source, **trained
    ), record


def _construct(cls: Any, method: str, options: dict[str, Any], **fixed: Any):
    """Build ``cls`` with the keyword-only options it takes, refusing others."""
    accepted = [
        name
        for name, p in inspect.signature(cls).parameters.items()
        if p.kind == p.KEYWORD_ONLY and name not in fixed
    ]
    unknown = sorted(set(options) - set(accepted))
    if unknown:
        takes = f"it takes {accepted}" if accepted else "it takes none"
        raise TypeError(f"method={method!r} got option(s) {unknown} it does not take; {takes}.")
    return cls(**fixed, **options)


def _result(
    names: list[str],
    values: np.ndarray,
    predictor: PerturbationPredictor,
    *,
    perturbation_key: str,
    var: pd.DataFrame,
    params: dict[str, Any],
) -> AnnData:
    from anndata import AnnData

    from ..models.perturbation import join_perturbation, split_perturbation

    data = predictor.data
    pred = AnnData(
        X=values.astype(np.float32),
        obs=pd.DataFrame(index=pd.Index(names, name=None)),
        var=var,
    )
    pred.obs[perturbation_key] = pd.Categorical(names, categories=names)
    canonical = [join_perturbation(split_perturbation(n, data.sep), data.sep) for n in names]
    pred.obs["n_cells_observed"] = [len(data.rows.get(n, ())) for n in canonical]
    pred.var["control_mean"] = data.control_mean.astype(np.float32)
    pred.uns[KEY] = {"params": params}
    return pred


@doc_params(
    layer=DOC_LAYER,
    random_state=DOC_RANDOM_STATE,
    chunk_size=DOC_CHUNK_SIZE,
    default_model=DEFAULT_MODEL,
)
def predict_perturbation(
    adata: AnnData | None,
    perturbations: Sequence[str] | str,
    *,
    perturbation_key: str = "perturbation",
    control: str = "control",
    model: Any = None,
    method: Method | None = None,
    layer: str | None = None,
    sep: str = "+",
    max_epochs: int | None = None,
    random_state: int | None = 0,
    device: str | None = None,
    return_model: bool = False,
    mod: str | None = None,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    **method_kwargs: Any,
) -> AnnData | tuple[AnnData, PerturbationPredictor]:
    """Predict the mean expression of perturbed cells, learnt from the perturbations observed.

    A predictor learns from the cells of ``adata`` (raw counts; each cell's perturbation in
    ``obs[perturbation_key]``, combinations written ``"A+B"``, the control cells named
    ``control``) and predicts each requested perturbation: single genes, combinations, and
    genes never perturbed in ``adata``. Expression is log-normalised as scanpy's
    ``normalize_total(target_sum=1e4)`` then ``log1p``, and the predictions are means of it.

    The methods:

    - ``"additive"`` (the default, ``method=None``): a combination is the sum of its genes'
      observed single effects (effect: mean minus the control mean). A gene never perturbed
      alone in ``adata`` counts as the mean single effect, with the gene itself (when it is
      read out) moved by the mean self-effect of the observed singles (logged). It is the
      default because no model-based method here beats it on held-out perturbations
      (benchmarks/results/perturbation.md), as Ahlmann-Eltze et al. (Nat Methods 2025) found
      for published models. Pearson delta over the top-20 DE genes, additive against the best
      model-based method: held-out Norman doubles 0.834 vs 0.842 (``"linear"``, which is the
      additive sum on 4 of the 5 doubles and higher on the fifth), held-out Norman singles
      0.606 vs 0.589, held-out Papalexi knockouts 0.459 vs 0.464 (``"linear"``, lower on 14 of
      22). The model-based methods' discrimination scores on held-out singles are better than
      the baselines' (``"gears"``: Norman 0.538 vs 0.443, Papalexi 0.510 vs 0.496;
      ``"finetune"``, whose changes barely correlate with the observed ones: 0.540, 0.550).
    - ``"control"``: no change (the control mean); ``"mean"``: the mean effect of the observed
      perturbations, the same for every prediction.
    - ``"linear"``: the linear model of Ahlmann-Eltze et al. with the perturbed genes' token
      embeddings from ``model`` as ``P`` and the principal components of the observed single
      effects as ``G`` (:class:`~scfm_tools.models.perturbation.LinearPredictor`); genes
      perturbed alone in ``adata`` keep their observed effect, combinations are sums. Options:
      ``n_components`` (10) and ``ridge`` (0.1), the paper's.
    - ``"gears"``: a GEARS-style gene-graph network whose gene features are ``model``'s token
      embeddings, scFoundation's route (:class:`~scfm_tools.models.perturbation.GearsPredictor`):
      read-out genes linked by co-expression, perturbed genes by embedding similarity to the
      genes perturbed in ``adata``, a combination as the sum of its genes' perturbation
      embeddings; trained on resampled means of the observed perturbations, singles and
      combinations alike (``max_epochs``, default 100; a few seconds to a minute on a CPU).
      Options: ``hidden`` (64), ``n_neighbors`` (5), ``coexpression_neighbors`` (10),
      ``batch_size`` (16), ``cells_per_mean`` (32), ``lr`` (1e-3), ``weight_decay`` (1e-4).
    - ``"finetune"``: scGPT's perturbation fine-tuning, as the official tutorial
      (:class:`~scfm_tools.models.scgpt.SCGPTPerturbationPredictor`): a copy of the scGPT
      ``model`` gets a perturbation-flag embedding on its gene tokens and an affine decoder,
      reads a control cell's log-normalised values at every read-out gene and is trained to
      give a perturbed cell's (MSE over all genes, Adam at 1e-4, ``max_epochs`` default 15 as
      the tutorial); predictions average over control cells. A perturbed gene that is not
      read out is added as a flagged token. Options: ``batch_size`` (64), ``lr`` (1e-4),
      ``cells_per_perturbation`` (``None``: all cells each epoch), ``control_cells`` (300).

    Parameters
    ----------
    adata
        Cells x genes, raw counts, with the control and the observed perturbations. A
        :class:`mudata.MuData` is accepted with ``mod=``. ``None`` only with a fitted predictor
        as ``model``. It is not changed.
    perturbations
        Perturbations to predict: gene names (``"KLF1"``) or combinations (``"KLF1+MAP2K6"``).
    perturbation_key
        Column of ``adata.obs`` with each cell's perturbation.
    control
        The control cells' value of ``obs[perturbation_key]`` (e.g. non-targeting guides).
    model
        The foundation model whose gene embeddings (``"linear"``, ``"gears"``) describe the
        perturbed genes, or the scGPT to fine-tune (``"finetune"``): a registered name, a
        checkpoint path or a model object; ``None`` uses the default that ships with the
        package (``"{default_model}"``). The baselines read none (leave it ``None``). Or a
        predictor returned by an earlier call with ``return_model=True``: it predicts again
        without refitting (``adata`` may then be ``None``; ``method`` must be ``None`` or its
        own).
    method
        ``"additive"``, ``"mean"``, ``"control"``, ``"linear"``, ``"gears"`` or
        ``"finetune"``; ``None``: ``"additive"``.
    {layer}
    sep
        What joins the genes of a combination.
    max_epochs
        Training epochs of the methods that train (``None``: the method's default); must be
        ``None`` for the others.
    {random_state}
        The training's initialisation and draws.
    device
        Device of the methods that train (``None``: ``sft.settings.device``).
    return_model
        Also return the fitted predictor, to predict more perturbations later (pass it as
        ``model``, or call its ``predict``).
    mod
        Modality of a MuData (default ``"rna"``).
    {chunk_size}
    **method_kwargs
        Options of the method (listed above); an option the method does not take is refused.

    Returns
    -------
    An AnnData with one row per requested perturbation (in the order given, repeats dropped)
    over the genes of ``adata``:

    - ``X``: predicted mean ``log1p`` of counts per 10,000 (float32);
    - ``obs[perturbation_key]``: the perturbation; ``obs["n_cells_observed"]``: its cells in
      ``adata`` (0 for a perturbation never observed);
    - ``var["control_mean"]``: the control cells' mean, the reference of the effects;
    - ``uns["predict_perturbation"]["params"]``: method, model (name, weights sha256), the
      method's options and the training sizes.

    With ``return_model=True``, the tuple ``(predictions, predictor)``.

    Raises
    ------
    InputError
        No control cells, values that are not raw counts, or a perturbed gene the method
        cannot predict (``"linear"``: a gene outside the model's vocabulary that ``adata``
        never perturbed alone; ``"gears"`` and ``"finetune"``: one that ``adata`` never
        perturbed at all).
    NotImplementedError
        ``method="finetune"`` with a model that is not an scGPT.
    """
    from ..models.perturbation import PerturbationData, PerturbationPredictor

    names = _names(perturbations)
    if method is not None and method not in METHODS:
        raise ValueError(f"method must be one of {list(METHODS)} or None, got {method!r}.")
    if isinstance(model, PerturbationPredictor):
        return _reuse(
            adata, names, model, method, perturbation_key, return_model, method_kwargs, mod
        )
    if adata is None:
        raise ValueError(
            "adata is None: pass the AnnData to learn from, or a fitted predictor as model=."
        )
    _, ad = resolve_adata(adata, mod=mod)
    _check_input(ad, perturbation_key, control, layer, chunk_size)
    method = DEFAULT_METHOD if method is None else method
    seed = resolve_seed(random_state)
    started = time.perf_counter()
    data = PerturbationData.from_anndata(
        ad, perturbation_key, control, layer=layer, sep=sep, chunk_size=chunk_size
    )
    predictor, model_record = _build(
        method,
        model,
        data,
        max_epochs=max_epochs,
        random_state=seed,
        device=device,
        options=dict(method_kwargs),
    )
    predictor.check_predictable(names, data)
    predictor.fit(data)
    values = predictor.predict(names)
    params = params_record(
        **predictor.params(),
        **model_record,
        perturbation_key=perturbation_key,
        control=control,
        layer=layer,
        random_state=seed,
        options=dict(method_kwargs) or None,
    )
    logger.info(
        "predict_perturbation: %d perturbation(s) predicted by %r, learnt from %d in %.1f s",
        len(names),
        method,
        len(data.perturbations),
        time.perf_counter() - started,
    )
    pred = _result(
        names,
        values,
        predictor,
        perturbation_key=perturbation_key,
        var=ad.var[[]].copy(),
        params=params,
    )
    predictor.record_ = params
    return (pred, predictor) if return_model else pred


def _reuse(adata, names, predictor, method, perturbation_key, return_model, options, mod):
    """Predict with a predictor fitted by an earlier call."""
    if method is not None and method != predictor.method:
        raise ValueError(
            f"model is a fitted {predictor.method!r} predictor; leave method=None (or "
            f"{predictor.method!r}), or refit with another method."
        )
    if options:
        raise TypeError(f"options {sorted(options)} do not apply to a fitted predictor.")
    genes = predictor.genes
    if adata is not None:
        _, ad = resolve_adata(adata, mod=mod)
        if not np.array_equal(np.asarray(ad.var_names), genes):
            raise InputError(
                "adata's genes are not those the predictor was fitted on; pass adata=None or the "
                "AnnData it learnt from."
            )
    var = pd.DataFrame(index=pd.Index(genes))
    pred = _result(
        names,
        predictor.predict(names),
        predictor,
        perturbation_key=perturbation_key,
        var=var,
        params=getattr(predictor, "record_", {"method": predictor.method}),
    )
    return (pred, predictor) if return_model else pred
