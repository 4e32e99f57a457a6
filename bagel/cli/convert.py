"""``bagel-convert``: turn a plain folder of images with captions (or a JSONL) into upstream BAGEL's
parquet layout plus a dataset YAML (see :func:`bagel.data.convert.main` for the arguments)."""

from __future__ import annotations

import sys

from bagel.data.convert import main

__all__ = ["main"]

if __name__ == "__main__":
    sys.exit(main())
