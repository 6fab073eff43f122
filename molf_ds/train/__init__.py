"""The training job `molf-train`, built on the `molf_ds` library: the recipe (set-up → loop →
exports), its configuration, data and tasks, evaluation, telemetry, plots and sweep tables.

Nothing in the library imports this package; it needs the ``train`` extra
(``pip install molf-ds[train]``).
"""
