"""Real public single-cell datasets, fetched with pooch and verified by sha256."""
