"""The jobs: preflight, the Ray Train fine-tuning job, export and registration, evaluation, the pipeline.

Lives here: ``preflight`` (check a run before it trains; no weights loaded), ``loop`` and ``dropout`` (the
training loop, free of Ray, so it runs bare on a GPU machine), ``train`` (the Ray Train job around the loop),
``export`` (checkpoint to adapter directory, registration), ``evaluate`` (an adapter against its base on the
holdout split), ``artifacts`` (the registry from the shell), and the two composition roots: ``pipeline`` (every
stage from data to a running endpoint) and ``cli`` (the ``qlora-ray`` command).

May import: ``data``, ``qlora_ray`` and itself; only the roots (``pipeline``, ``cli``) may import ``tune`` and
``serve``, and no stage imports a root.
"""
