"""The training job `molf-train` and its commands, built on the `molf_ds` library.

Entry points: `recipe.main` (molf-train: a `recipe.Recipe`, the same for every mode, and
`methods.METHODS`, what differs by ``mode``), `estimate.main` (molf-estimate), `plot.main`
(molf-plot), `sweep.main` (molf-sweep). Every module, one line each: docs/design.md, "The code
layout".

Nothing in the library imports this package; it needs the ``train`` extra
(``pip install molf-ds[train]``), except molf-estimate, which needs only the library.
"""
