"""The library every stage shares: one config, one model loader, one registry, one way to reach Ray.

Lives here: ``config`` (the one schema and its overrides), ``model`` (the one loader: NF4 or unquantised base,
LoRA targets), ``generate`` (decoding and adapter sets, shared by evaluation and Serve), ``registry`` (named
adapters with manifests), ``storage`` (local paths and URIs, read and written one way), ``runtime`` (Ray
start-up, shared-storage checks, remote error messages), ``metrics`` (the one table of answer-quality
metrics), ``card`` (model cards), ``console`` (what the console shows, the run's log file), ``cli`` (the
command-line shape and the one error path) and ``errors`` (the base class of the project's errors).

May import: ``data`` and itself. Never a stage (``jobs``, ``tune``, ``serve``): the stages build on it.
"""
