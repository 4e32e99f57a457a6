"""File and checkpoint I/O that needs no higher room: JSON and safetensors readers (:mod:`bagel.io.files`)
and the checkpoint loader/saver of the model's state dict (:mod:`bagel.io.checkpoint`)."""
