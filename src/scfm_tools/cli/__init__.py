"""The ``scfm-tools`` command line: ``embed``, ``impute``, ``annotate`` and ``pretrain``.

``scfm-tools embed IN.h5ad -o OUT.h5ad`` (or ``python -m scfm_tools embed ...``) runs
:func:`sft.tl.embed_cells <scfm_tools.tl.embed_cells>` on a file and writes the result to a new
file; ``scfm-tools --help`` and ``scfm-tools <command> --help`` list the options.
"""

from ._main import build_parser, main

__all__ = ["build_parser", "main"]
