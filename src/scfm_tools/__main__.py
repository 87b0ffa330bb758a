"""``python -m scfm_tools``: the ``scfm-tools`` command line."""

from __future__ import annotations

from .cli import main

if __name__ == "__main__":
    raise SystemExit(main())
