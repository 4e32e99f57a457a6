"""Data: samples and packing into the forward's inputs (:mod:`bagel.data.packing`), dataset readers,
transforms, the streaming packer and its loader state."""
