"""The Ray Serve app: an OpenAI-compatible HTTP API over the registry's adapters, and its chat page.

Lives here: ``app`` (the ingress: routes, auth, limits, errors in OpenAI's shape), ``protocol`` (the request
and response bodies), ``generator`` (the replica: base model, multiplexed adapters, continuous batching),
``grounding`` (stored answers and declines from an adapter's Q&A set), ``__main__`` (``python -m serve``:
deploy from a run config), ``config.yaml`` (for ``serve run``/``serve deploy``) and ``static/`` (the chat page).

May import: ``data`` and ``qlora_ray``. Never ``jobs`` or ``tune``: a Serve process loads no training code
(no loop, no optimizer, no Ray Train), which a test checks.
"""
