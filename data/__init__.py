"""Data: reading dataset files, the row formats, prompt templates, tokenisation with label masking, splits.

Lives here: ``formats`` (read JSON/JSONL/CSV/Parquet/``datasets`` directories and normalise each row into an
example, one module per format), ``templates`` (the one prompt formatter), ``tokenize`` (prompt + completion
tokens, labels masked on the prompt, truncation, length-grouped batches), ``splits`` (the seeded holdout,
stratified by tag) and ``dataset`` (all of it at once for a run).

May import: nothing of the project but ``qlora_ray.errors`` (the error base class). Everything else builds
on this room, so it stays free of Ray, models and the config schema.
"""
