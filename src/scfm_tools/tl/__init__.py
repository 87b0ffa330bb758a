"""Tools: tasks that run a model on AnnData and write the results back into it."""

from ._annotate import annotate
from ._embed_cells import embed_cells
from ._impute import impute

__all__ = ["annotate", "embed_cells", "impute"]
