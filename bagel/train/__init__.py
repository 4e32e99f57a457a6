"""Training: distributed set-up (:mod:`bagel.train.distributed`) and the ``bagel-train`` runner."""
