"""Ray Tune sweeps: the search space, the sweep driver, best-trial selection and the sweep report.

Lives here: ``space`` (the search space keyed by dotted config keys, searchers, ASHA), ``sweep`` (the driver:
every trial runs the train job's loop; the best trial is registered), ``trial`` (a one-worker trial trained in
its Tune actor on a base model kept from trial to trial) and ``report``
(trials.csv, trials.json, sweep.png and the console table).

May import: ``data``, ``qlora_ray`` and the ``jobs`` stages it runs (train, preflight, export, evaluate).
Never ``serve``, and never the pipeline: the pipeline imports this room, not the other way round.
"""
