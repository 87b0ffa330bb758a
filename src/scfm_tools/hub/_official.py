"""Cards of the officially published checkpoints.

None of the upstream projects publishes checksums, and only CellPLM's config file has a direct
link (the repository at a pinned commit), so most files are manual downloads: ``fetch`` explains
where to get them and where to put them. To serve them from a mirror with known hashes,
``register`` a copy of the card with ``url``/``sha256`` filled in (``overwrite=True``).
"""

from __future__ import annotations

from ._card import CardFile, ModelCard

__all__ = ["OFFICIAL_CARDS"]

_DRIVE = "https://drive.google.com/drive/folders/{}"

_CITE_SCGPT = (
    "Cui, H., Wang, C., Maan, H., Pang, K., Luo, F., Duan, N. & Wang, B. scGPT: toward building a "
    "foundation model for single-cell multi-omics using generative AI. Nature Methods 21, "
    "1470-1480 (2024). doi:10.1038/s41592-024-02201-0"
)
_CITE_SCFOUNDATION = (
    "Hao, M., Gong, J., Zeng, X., Liu, C., Guo, Y., Cheng, X., Wang, T., Ma, J., Zhang, X. & "
    "Song, L. Large-scale foundation model on single-cell transcriptomics. Nature Methods 21, "
    "1481-1491 (2024). doi:10.1038/s41592-024-02305-7"
)
_CITE_SCBERT = (
    "Yang, F., Wang, W., Wang, F., Fang, Y., Tang, D., Huang, J., Lu, H. & Yao, J. scBERT as a "
    "large-scale pretrained deep language model for cell type annotation of single-cell RNA-seq "
    "data. Nature Machine Intelligence 4, 852-866 (2022). doi:10.1038/s42256-022-00534-z"
)
_CITE_CELLPLM = (
    "Wen, H., Tang, W., Dai, X., Ding, J., Jin, W., Xie, Y. & Tang, J. CellPLM: Pre-training of "
    "Cell Language Model Beyond Single Cells. International Conference on Learning "
    "Representations (ICLR 2024). bioRxiv doi:10.1101/2023.10.03.560734"
)

# Values of the published whole-human args.json (the organ models share the architecture; their
# own args.json is read at load time anyway).
_SCGPT_CONFIG = {
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

# (card name, Drive folder id, description)
_SCGPT_MODELS = (
    (
        "scgpt-human",
        "1oWh_-ZRdhtoGQ2Fw24HP41FgLoomVo-y",
        "pretrained on 33 million normal human cells (CELLxGENE); the authors' default",
    ),
    (
        "scgpt-human-continual",
        "1_GROJTzXiAV8HB4imruOTk6PEGuNOcgB",
        "the whole-human model after continual pretraining, for zero-shot cell embedding",
    ),
    ("scgpt-brain", "1vf1ijfQSk7rGdDGpBntR5bi5g6gNt-Gx", "pretrained on 13.2 million brain cells"),
    (
        "scgpt-blood",
        "1kkug5C7NjvXIwQGGaGoqXTk_Lb_pDrBU",
        "pretrained on 10.3 million blood and bone marrow cells",
    ),
    ("scgpt-heart", "1GcgXrd7apn6y4Ze_iSCncskX3UsWPY2r", "pretrained on 1.8 million heart cells"),
    ("scgpt-lung", "16A1DJ30PT6bodt4bWLa4hpS7gbWZQFBG", "pretrained on 2.1 million lung cells"),
    (
        "scgpt-kidney",
        "1S-1AR65DF120kNFpEbWCvRHPhpkGK3kK",
        "pretrained on 814 thousand kidney cells",
    ),
    (
        "scgpt-pan-cancer",
        "13QzLHilYUd0v3HTwa_9n4G4yEF-hdkqa",
        "pretrained on 5.7 million cells of various cancer types",
    ),
)


def _scgpt_card(name: str, folder_id: str, what: str) -> ModelCard:
    url = _DRIVE.format(folder_id)
    return ModelCard(
        name=name,
        family="scgpt",
        description=f"Official scGPT checkpoint: {what}.",
        files=(
            CardFile(
                "best_model.pt",
                description="state dict (flash-attn layout: self_attn.Wqkv.* attention keys)",
                role="weights",
            ),
            CardFile("args.json", description="model hyper-parameters", role="args"),
            CardFile("vocab.json", description="gene symbol -> token id", role="vocab"),
        ),
        config=_SCGPT_CONFIG if name == "scgpt-human" else {},
        license="MIT (bowang-lab/scGPT repository)",
        citation=_CITE_SCGPT,
        homepage="https://github.com/bowang-lab/scGPT",
        source_url=url,
        manual_download=(
            f"Open the Google Drive folder {url} in a browser and download its three files, "
            "best_model.pt, args.json and vocab.json (Google Drive offers no stable direct link "
            "to files of a shared folder). Keep the file names. No checksums are published, so "
            "the files are accepted as they are and a warning says they were not verified."
        ),
    )


_SCFOUNDATION_URL = (
    "https://hopebio2020.sharepoint.com/:f:/s/PublicSharedfiles/"
    "EmUQnvZMETlDvoCaBduCNeIBQArcOrd8T8iEpiGofFZ9CQ?e=3SpPZU"
)
_SCBERT_CKPT_URL = "https://drive.weixin.qq.com/s?k=AJEAIQdfAAoUxhXE7r"
_SCBERT_DATA_URL = "https://drive.weixin.qq.com/s?k=AJEAIQdfAAozQt5B8k"
_SCBERT_DATA_GDRIVE = (
    "https://drive.google.com/file/d/1fNZbKx6LPeoS0hbVYJFI8jlDlNctZxlU/view?usp=sharing"
)
_CELLPLM_DROPBOX = (
    "https://www.dropbox.com/scl/fo/i5rmxgtqzg7iykt2e9uqm/h?rlkey=o8hi0xads9ol07o48jdityzv1&dl=0"
)
_CELLPLM_COMMIT = "b59ee7688b1bd2a745856a610248b46f15019a22"

OFFICIAL_CARDS: tuple[ModelCard, ...] = (
    *(_scgpt_card(*spec) for spec in _SCGPT_MODELS),
    ModelCard(
        name="scfoundation",
        family="scfoundation",
        description=(
            "Official scFoundation (xTrimoGene) checkpoint, pretrained on over 50 million human "
            "single-cell transcriptomes; models.ckpt holds three variants: 'cell' (cell "
            "embedding), 'gene' (gene-context embedding) and 'rde' (read-depth enhancement)."
        ),
        files=(
            CardFile(
                "models.ckpt",
                description="dict {'gene', 'cell', 'rde'} of {'config', 'state_dict'} entries",
                role="weights",
            ),
        ),
        config={
            "gene_num": 19266,
            "seq_len": 19266,
            "encoder": {
                "hidden_dim": 768,
                "depth": 12,
                "heads": 12,
                "dim_head": 64,
                "module_type": "transformer",
                "norm_first": False,
            },
            "decoder": {
                "hidden_dim": 512,
                "depth": 6,
                "heads": 8,
                "dim_head": 64,
                "module_type": "performer",
                "norm_first": False,
            },
            "n_class": 104,
            "pad_token_id": 103,
            "mask_token_id": 102,
            "bin_num": 100,
            "bin_alpha": 1.0,
            "model": "mae_autobin",
            "gene_index": "OS_scRNA_gene_index.19264.tsv (official repository)",
        },
        license=(
            "scFoundation Model License (MODEL_LICENSE): weights for non-commercial research use "
            "only, no redistribution; the code is Apache-2.0"
        ),
        citation=_CITE_SCFOUNDATION,
        homepage="https://github.com/biomap-research/scFoundation",
        source_url=_SCFOUNDATION_URL,
        manual_download=(
            f"Open the SharePoint folder {_SCFOUNDATION_URL} in a browser and download "
            "models.ckpt (read MODEL_LICENSE in the scFoundation repository first: the weights "
            "are for non-commercial research only). Keep the file name. No checksum is "
            "published, so the file is accepted as it is and a warning says it was not verified."
        ),
    ),
    ModelCard(
        name="scbert",
        family="scbert",
        description=(
            "Official scBERT checkpoint pretrained (masked expression bins) on PanglaoDB human "
            "scRNA-seq; 16,906 genes with gene2vec gene embeddings."
        ),
        files=(
            CardFile(
                "panglao_pretrain.pth",
                description="torch.save dict; weights under 'model_state_dict'",
                role="weights",
            ),
            CardFile(
                "gene_list.txt",
                # Third-party hash of "\n".join(var_names of panglao_10000.h5ad).
                sha256="4c09ba1912e184682fe5e7f32e2b443bdfb7883d0d0191551b38c6c2f155600f",
                description=(
                    "the 16,906 gene symbols of panglao_10000.h5ad, in order, one per line, "
                    "no trailing newline"
                ),
                role="gene_list",
            ),
        ),
        config={
            "num_tokens": 7,
            "dim": 200,
            "depth": 6,
            "heads": 10,
            "dim_head": 64,
            "max_seq_len": 16907,
            "bin_num": 5,
            "g2v_position_emb": True,
            "nb_features": 266,
        },
        license="GPL-3.0 (TencentAILabHealthcare/scBERT LICENSE: covers code and model weights)",
        citation=_CITE_SCBERT,
        homepage="https://github.com/TencentAILabHealthcare/scBERT",
        source_url=_SCBERT_CKPT_URL,
        manual_download=(
            f"1. Download panglao_pretrain.pth from {_SCBERT_CKPT_URL} (WeChat Drive, in a "
            "browser). 2. The gene list is not in the scBERT repository: download "
            f"panglao_10000.h5ad from the scBERT data share ({_SCBERT_DATA_URL} or "
            f"{_SCBERT_DATA_GDRIVE}) and write its gene names, in order, one per line and "
            'without a trailing newline, to gene_list.txt, e.g. `python -c "import anndata; '
            "g = anndata.read_h5ad('panglao_10000.h5ad', backed='r').var_names; "
            "open('gene_list.txt', 'w').write(chr(10).join(g))\"`. gene_list.txt is checked "
            "against its known sha256; the checkpoint has no published checksum."
        ),
    ),
    ModelCard(
        name="cellplm",
        family="cellplm",
        description=(
            "Official CellPLM checkpoint 20230926_85M (cells as tokens; Flowformer encoder, "
            "Gaussian-mixture latent, negative-binomial decoder), pretrained on scRNA-seq and "
            "spatial transcriptomics; 19,374 Ensembl gene ids."
        ),
        files=(
            CardFile(
                "20230926_85M.config.json",
                url=(
                    f"https://raw.githubusercontent.com/OmicsML/CellPLM/{_CELLPLM_COMMIT}"
                    "/ckpt/20230926_85M.config.json"
                ),
                sha256="949ae2ba0e099fcb37859f3dbb82d7c2a7ac00b9bce41a2de4004797a60c02c3",
                size=368869,
                description="model hyper-parameters and the gene list (Ensembl ids)",
                role="config",
            ),
            CardFile(
                "20230926_85M.best.ckpt",
                description="torch.save dict; weights under 'model_state_dict'",
                role="weights",
            ),
        ),
        config={
            "enc_mod": "flowformer",
            "enc_hid": 1024,
            "enc_layers": 4,
            "latent_mod": "gmvae",
            "num_clusters": 16,
            "post_latent_dim": 512,
            "dec_mod": "nbmlp",
            "dec_hid": 1024,
            "dec_layers": 2,
            "out_dim": 19374,
            "batch_num": 12596,
            "dataset_num": 484,
        },
        license="BSD-2-Clause (OmicsML/CellPLM repository)",
        citation=_CITE_CELLPLM,
        homepage="https://github.com/OmicsML/CellPLM",
        source_url=_CELLPLM_DROPBOX,
        manual_download=(
            f"Open the Dropbox folder {_CELLPLM_DROPBOX} in a browser and download "
            "20230926_85M.best.ckpt (the config file 20230926_85M.config.json is fetched "
            "automatically from the CellPLM repository, or take it from the same folder). Keep "
            "the file names. The checkpoint has no published checksum, so it is accepted as it "
            "is and a warning says it was not verified."
        ),
    ),
)
