"""Model families, scvi-tools style: a pure-torch module and an AnnData-facing model class.

Importing :mod:`scfm_tools.models` imports torch and scvi-tools; the top-level package imports
it lazily (``sft.models``).
"""

from .cellplm import CellPLM
from .scbert import SCBERT
from .scfoundation import SCFoundation
from .scgpt import SCGPT

__all__ = ["SCBERT", "SCGPT", "CellPLM", "SCFoundation"]
