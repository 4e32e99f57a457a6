"""The command-line apps: ``bagel-demo`` (:mod:`bagel.cli.demo`), ``bagel-bench`` (:mod:`bagel.cli.bench`)."""
