"""Preprocessing: value binning, read-depth-aware downsampling, gene-vocabulary matching."""
