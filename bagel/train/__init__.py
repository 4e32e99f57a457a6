"""Training: the ``bagel-train`` runner and its parts.

- :mod:`bagel.train.config`: the typed configuration tree (YAML + ``section.field=value`` overrides);
- :mod:`bagel.train.distributed`: process group, device mesh (plain or hybrid sharding), FSDP2;
- :mod:`bagel.train.build`: the model on meta, freezing, LoRA, sharding, per-rank slice loading;
- :mod:`bagel.train.tensor_files`: safetensors row reader and streaming writer;
- :mod:`bagel.train.data_source`: synthetic packs or the :mod:`bagel.data` pipeline with the FLUX VAE;
- :mod:`bagel.train.ema`: the EMA on the parameters' shards;
- :mod:`bagel.train.checkpoint`: resumable DCP checkpoints (temporary name + rename, keep K, resume auto);
- :mod:`bagel.train.export`: config.json + ema.safetensors tensor by tensor, LoRA adapter and merge;
- :mod:`bagel.train.metrics`: JSONL, TensorBoard, progress bar, loss plot, MFU;
- :mod:`bagel.train.trainer`: the loop (:func:`bagel.train.trainer.train`);
- :mod:`bagel.train.memory`: the BAGEL-7B-MoT memory table on fake tensors.
"""
