"""The backend names of each op family, for command lines that refuse a bad name before importing torch.

The names are declared with the backends themselves (``ATTENTION``, ``MOT`` and ``PATCH_EMBED`` in
:mod:`bagel_kernels.attention`, :mod:`bagel_kernels.mot` and :mod:`bagel_kernels.patch_embed`), and
:class:`bagel.BagelBackendConfig` validates against those. These tuples copy them for a module that imports
nothing, so that ``bagel-demo --attention nonsense`` is refused in a fraction of a second;
``tests/test_dispatch.py`` checks that the copy equals the declarations.
"""

ATTENTION_BACKENDS = ("auto", "triton", "flex", "sdpa")
MOT_BACKENDS = ("auto", "triton", "torch")
PATCH_EMBED_BACKENDS = ("auto", "cuda", "cpu_ext", "torch")
