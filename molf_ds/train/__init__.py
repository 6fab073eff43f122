"""The training job `molf-train` and its commands, built on the `molf_ds` library.

* `recipe`: `Recipe` (set-up → loop → exports) and ``main``, molf-train's entry point;
* `methods`: the table `METHODS` of what differs by ``mode`` (model, engine, hook, exports);
* `models`: the presets the job builds (`JOB_PRESETS`), `load_model`, `build_model`;
* `distributed`: launch environment, `free_port`, agreement between ranks, preemption signals;
* `schedule`: the learning-rate schedule; `config`: the options; `data`, `tasks`, `sql_task`,
  `tokenizer`: the data; `evaluate`; `storage`: checkpoints and disk space; `peers`: lost
  ranks; `console`, `telemetry`: what a run shows and writes;
* the other commands: `estimate` (molf-estimate), `plot` (molf-plot), `sweep` (molf-sweep).

Nothing in the library imports this package; it needs the ``train`` extra
(``pip install molf-ds[train]``), except molf-estimate, which needs only the library.
"""
