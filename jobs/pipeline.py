"""The whole job, from data to a running endpoint: ``python -m jobs.pipeline --config PATH [key=value ...]``.

Stages, in order:

1. ``preflight``: data, LoRA targets and memory are checked, and the data tokenised once;
2. ``train``: the Ray Tune sweep (``tune.sweep``), or one Ray Train run with ``sweep.enabled: false``; the
   best adapter is registered in ``run.registry`` as ``run.name`` with its manifest and model card;
3. ``evaluate``: the adapter against its base model on the holdout split (``jobs.evaluate``): ``eval.json``
   beside it and the numbers in its model card;
4. ``deploy``: the Serve app (``python -m serve``) on ``serve.host``:``serve.port``;
5. ``smoke``: one holdout question through the deployed endpoint's OpenAI-compatible API.

It ends by printing the endpoint and its chat page, a curl and an ``openai`` example, the TensorBoard command
and the model card.
On a local Ray (no cluster address) the process then keeps serving until Ctrl-C; under ``ray job submit``
the app stays up on the cluster after the job ends.

A stage that fails stops the pipeline with the stage's name and the fix. What finished stages produced is
kept, and their completion is recorded in ``<run.storage_path>/<run.name>.pipeline.json``: rerunning the same
command resumes from the first unfinished stage (a sweep or training run that was cut off continues from
its checkpoints). Deployment and the smoke query run every time.
"""

from __future__ import annotations

import json
import logging
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from typing import Any

from data.templates import messages_for
from jobs.evaluate import overview, run_evaluate
from jobs.export import register_checkpoint, registered_by
from jobs.preflight import prepare_run
from jobs.train import run_train
from qlora_ray import cli
from qlora_ray.config import Config, changed_keys
from qlora_ray.errors import QloraRayError
from qlora_ray.runtime import start_ray, storage_path
from qlora_ray.storage import read_text, write_text
from serve.__main__ import run_serve, serve_until_interrupted, wait_healthy
from serve.auth import api_keys
from tune.sweep import prepare_sweep, run_sweep

log = logging.getLogger(__name__)

STAGES = ("preflight", "train", "evaluate", "deploy", "smoke")
SMOKE_TOKENS = 32


class StageError(QloraRayError, RuntimeError):
    """A stage that failed; the message names it, the cause and how to resume."""


@dataclass
class PipelineState:
    """What finished stages produced, saved after each so that a rerun resumes from the first unfinished one."""

    location: str
    config: dict[str, Any]
    finished: dict[str, dict[str, Any]] = field(default_factory=dict)

    @classmethod
    def load(cls, cfg: Config, storage: str) -> PipelineState:
        location = f"{storage.rstrip('/')}/{cfg.run.name}.pipeline.json"
        now = cfg.model_dump()
        text = read_text(location)
        if text is None:
            return cls(location, now)
        saved = json.loads(text)
        changed = changed_keys(saved["config"], now)
        if changed:
            raise StageError(
                f"{location} records a pipeline run with other settings ({', '.join(changed)} differ): rerun "
                "with the same config to resume it, give this run another run.name, or delete that file to "
                "start over"
            )
        return cls(location, now, saved["finished"])

    def done(self, stage: str, outputs: dict[str, Any]) -> None:
        self.finished[stage] = outputs
        write_text(self.location, json.dumps({"config": self.config, "finished": self.finished}, indent=2))


@dataclass
class PipelineOutcome:
    url: str
    adapter: str  # registry name
    adapter_uri: str
    eval_path: str
    logdir: str  # the sweep's Tune results (TensorBoard files) or the training run's Ray Train directory
    tensorboard: bool  # whether logdir holds TensorBoard files
    answer: str  # the smoke query's
    answer_source: str  # which path gave it: model, or stored / declined with serve.grounding
    local: bool  # True: a local Ray that ends with this process


def run_pipeline(cfg: Config) -> PipelineOutcome:
    """Run every stage not yet finished; raise StageError naming the first one that fails."""
    stage, done = "preflight", {}
    try:
        cfg, check = _prepare(cfg)
        storage = storage_path(cfg, start_ray())
        state = PipelineState.load(cfg, storage)
        done = state.finished
        stage = "train"
        if _starting(stage, state):
            state.done(stage, _train(cfg, check, f"{storage.rstrip('/')}/{cfg.run.name}"))
        stage = "evaluate"
        if _starting(stage, state):
            evaluation = run_evaluate(cfg, cfg.run.name, prepared=(cfg, check))
            print(overview(evaluation.report, evaluation.path), flush=True)
            state.done(stage, {"path": evaluation.path})
        stage = "deploy"
        url, local = run_serve(cfg)
        stage = "smoke"
        assert check.data is not None
        answer, source = smoke_query(cfg, url, messages_for(check.data.holdout_examples[0]))
    except Exception as err:
        if not isinstance(err, (QloraRayError, OSError)):
            log.exception("stage %s: unexpected error", stage)  # a bug: keep its traceback for the report
        finished = [s for s in STAGES if s in done]
        kept = f"finished stages kept: {', '.join(finished)}; " if finished else ""
        raise StageError(
            f"stage {stage} failed: {err}\n{kept}fix the cause and rerun the same command to resume from "
            f"stage {stage}"
        ) from None
    return PipelineOutcome(url, cfg.run.name, done["train"]["adapter"], done["evaluate"]["path"],
                           done["train"]["logdir"], done["train"]["tensorboard"], answer, source, local)  # fmt: skip


def _prepare(cfg: Config) -> tuple[Config, Any]:
    """The preflight, once for the whole pipeline: a sweep's checks its largest rank."""
    if cfg.sweep.enabled:
        return prepare_sweep(cfg)
    return prepare_run(cfg)


def _starting(stage: str, state: PipelineState) -> bool:
    """Whether ``stage`` still has to run; logs either way."""
    if stage in state.finished:
        log.info("stage %s: finished before (%s), skipped", stage, state.location)
        return False
    log.info("stage %s: running", stage)
    return True


def _train(cfg: Config, check: Any, run_dir: str) -> dict[str, Any]:
    """The sweep, or one training run (in ``run_dir``) registered as the sweep registers its best trial."""
    if cfg.sweep.enabled:
        sweep = run_sweep(cfg, prepared=(cfg, check))
        return {"adapter": sweep.adapter, "logdir": sweep.path, "tensorboard": True}
    registered_by(cfg, run_dir)  # a registry name another run holds: refused now, not after training
    outcome = run_train(cfg, prepared=(cfg, check))
    source = {"kind": "train", "path": run_dir}
    uri = register_checkpoint(cfg, outcome.checkpoint, outcome.metrics, check, source)
    return {"adapter": uri, "logdir": outcome.run_path, "tensorboard": False}


def smoke_query(
    cfg: Config, url: str, messages: list[dict[str, str]], timeout_s: float = 300
) -> tuple[str, str]:
    """Ask the deployed endpoint one chat question with ``run.name``'s adapter: its answer and the answer's source.

    Waits for ``/healthz`` first: a replica loads its model after deployment returns.
    """
    deadline = time.monotonic() + timeout_s
    if not wait_healthy(url, timeout_s):
        raise StageError(f"{url}/healthz did not answer 200 within {timeout_s:.0f} s; see the Serve logs "
                         "(/tmp/ray/session_latest/logs/serve/)")  # fmt: skip
    keys = sorted(api_keys(cfg.serve))
    body = {"model": cfg.run.name, "messages": messages, "max_tokens": SMOKE_TOKENS, "temperature": 0}
    request = urllib.request.Request(
        f"{url}/v1/chat/completions", data=json.dumps(body).encode(), method="POST",
        headers={"Content-Type": "application/json"} | ({"Authorization": f"Bearer {keys[0]}"} if keys else {}),
    )  # fmt: skip
    try:
        with urllib.request.urlopen(request, timeout=max(1.0, deadline - time.monotonic())) as response:
            reply = json.loads(response.read())
    except urllib.error.HTTPError as err:
        raise StageError(f"POST {url}/v1/chat/completions answered {err.code}: {err.read().decode()[:500]}") from None
    return reply["choices"][0]["message"]["content"], reply.get("answer_source", "model")


def summary(cfg: Config, outcome: PipelineOutcome) -> str:
    """What a user needs next: the endpoint and how to query it, the dashboards, the model card."""
    secured = bool(api_keys(cfg.serve))  # then $KEY stands for one of the keys, which are never printed
    auth = ' -H "Authorization: Bearer $KEY"' if secured else ""
    key = 'os.environ["KEY"]' if secured else '"unused"'
    tensorboard = (
        f"TensorBoard: tensorboard --logdir {outcome.logdir}"
        if outcome.tensorboard
        else f"training run (checkpoints and their metrics): {outcome.logdir}; TensorBoard files come with sweeps"
    )
    return f"""
adapter {outcome.adapter}: {outcome.adapter_uri}
model card: {outcome.adapter_uri}/README.md   evaluation: {outcome.eval_path}
smoke query answered ({outcome.answer_source}): {outcome.answer!r}

endpoint: {outcome.url}/v1 (OpenAI-compatible), health: {outcome.url}/healthz, chat page: {outcome.url}/

curl {outcome.url}/v1/chat/completions -H "Content-Type: application/json"{auth} \\
  -d '{{"model": "{outcome.adapter}", "messages": [{{"role": "user", "content": "Hello"}}], "max_tokens": 64}}'

python - <<'EOF'
{"import os" + chr(10) if secured else ""}from openai import OpenAI
client = OpenAI(base_url="{outcome.url}/v1", api_key={key})
reply = client.chat.completions.create(model="{outcome.adapter}", messages=[{{"role": "user", "content": "Hello"}}])
print(reply.choices[0].message.content)
EOF

{tensorboard}
"""


def main(argv: list[str] | None = None, prog: str = "python -m jobs.pipeline") -> int:
    args = cli.parser(prog, cli.description(__doc__), example="sweep.enabled=false").parse_args(argv)
    return cli.run(args, lambda: _pipeline(cli.load(args, "pipeline")))


def _pipeline(cfg: Config) -> None:
    outcome = run_pipeline(cfg)
    print(summary(cfg, outcome), flush=True)
    if outcome.local:
        serve_until_interrupted()


if __name__ == "__main__":
    sys.exit(main())
