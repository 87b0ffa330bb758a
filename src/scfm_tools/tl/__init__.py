"""Tools: tasks that run a model on AnnData and write the results back into it."""

from ._embed_cells import embed_cells

__all__ = ["embed_cells"]
