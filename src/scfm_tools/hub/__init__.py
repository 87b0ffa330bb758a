"""Model cards and downloads of pretrained weights."""
