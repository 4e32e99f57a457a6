"""The BAGEL model: config, backend choice, the Qwen2 MoT language model (with its gather/scatter reference),
SigLIP-NaViT, the embeddings and connectors, the per-pack input preparation the forward runs, and the
documented ``BagelForUnifiedMultimodal``. Imports only :mod:`bagel.io` and :mod:`bagel_kernels` from below."""
