"""``bagel-encode``: precompute FLUX VAE latents of a folder of images or a parquet column to one
safetensors file (see :func:`bagel.vae.encode_main` for the arguments)."""

from __future__ import annotations

import sys

from bagel.vae import encode_main as main

__all__ = ["main"]

if __name__ == "__main__":
    sys.exit(main())
