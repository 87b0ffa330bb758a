"""Plotting: figures of what :mod:`scfm_tools.tl` wrote (matplotlib, scanpy conventions)."""
