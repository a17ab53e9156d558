"""Text generation for serving and evaluation: one inference loader, one adapter set, one decode loop.

No Ray inside. Serve's replicas and the evaluation job both call these, so what evaluation measures is what
Serve answers: same base model load, same adapters, same sampling.

- :func:`load_inference_model` loads the base for inference: NF4 on CUDA (as trained), and on CPU unquantised
  in the compute dtype (4-bit matmuls are slower than plain float32 ones on CPU).
- :class:`AdapterSet` puts several LoRA adapters on that one base (PEFT) and takes them off again.
- :func:`decode` generates for a batch of prompts at once, each row with its own adapter (PEFT's mixed-adapter
  batches), sampling settings, stop strings and token budget, yielding text deltas step by step; rows that
  finish leave the batch (and its key/value cache) at once. :class:`DecodeBatch` is its continuous form: rows
  join between steps, and a row with a ``seed`` samples from a generator of its own.
"""

from __future__ import annotations

import contextlib
import json
import logging
import weakref
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from data.tokenize import encode_prompt
from qlora_ray.config import ModelConfig
from qlora_ray.errors import QloraRayError
from qlora_ray.model import load_model

log = logging.getLogger(__name__)

BASE = "__base__"  # PEFT's name for "no adapter" in a mixed-adapter batch
SAFE_WEIGHTS = "adapter_model.safetensors"


class AdapterError(QloraRayError, ValueError):
    """An adapter directory that cannot be served; the message says why and what to do."""


def load_inference_model(cfg: ModelConfig, device: str = "cpu") -> Any:
    """The base model for generation on ``device``: NF4 on CUDA as configured, unquantised on CPU."""
    if not device.startswith("cuda"):
        cfg = cfg.model_copy(update={"quantization": "none"})
    model = load_model(cfg, device)
    model.eval()
    model.requires_grad_(False)
    return model


@dataclass
class AdapterSet:
    """LoRA adapters loaded side by side on one base model, addressed by name in :func:`decode`."""

    base: Any
    peft: Any = None
    names: set[str] = field(default_factory=set)

    @property
    def model(self) -> Any:
        return self.peft if self.peft is not None else self.base

    def load(self, name: str, directory: str | Path) -> None:
        """Load the adapter in ``directory`` (safetensors weights only: never a pickle) as ``name``."""
        from peft import PeftModel

        directory = Path(directory)
        check_adapter_dir(directory)
        self._unmerge()
        if self.peft is None:
            self.peft = PeftModel.from_pretrained(self.base, str(directory), adapter_name=name, is_trainable=False)
        else:
            self.peft.load_adapter(str(directory), adapter_name=name, is_trainable=False)
        self.peft.eval()
        self.names.add(name)

    def unload(self, name: str) -> None:
        """Free the adapter's weights; the last one stays registered (PEFT needs one) but is never used."""
        if name not in self.names:
            return
        self._unmerge()
        self.names.discard(name)
        if self.names:  # PEFT refuses to delete its only adapter; a later load replaces it
            self.peft.delete_adapter(name)
        else:
            self.peft = self.peft.unload()  # back to the plain base model, LoRA layers removed
            self.base = self.peft
            self.peft = None

    def _unmerge(self) -> None:
        if self.peft is not None and merged_adapters(self.peft):
            self.peft.unmerge_adapter()


def check_adapter_dir(directory: Path) -> None:
    """An adapter must be a PEFT LoRA directory with safetensors weights; pickled weights are refused."""
    if not (directory / "adapter_config.json").is_file():
        raise AdapterError(f"{directory} holds no adapter_config.json: it is not a PEFT adapter directory")
    if not (directory / SAFE_WEIGHTS).is_file():
        found = sorted(p.name for p in directory.iterdir())
        raise AdapterError(
            f"{directory} has no {SAFE_WEIGHTS} (found: {', '.join(found)}); adapters load from safetensors only. "
            "Convert it once with peft: PeftModel.from_pretrained(...).save_pretrained(dir, safe_serialization=True)"
        )
    config = json.loads((directory / "adapter_config.json").read_text())
    if config.get("peft_type") != "LORA":
        raise AdapterError(f"{directory} is a {config.get('peft_type')} adapter; only LoRA adapters are served")


@dataclass(frozen=True)
class Sampling:
    """How one request samples: temperature 0 is greedy; stop strings end the text and are not returned.

    A ``seed`` gives the row a random generator of its own, seeded with it: the same prompt, settings and seed
    give the same text on the same model and device, whatever else is in the batch. Rows without one share the
    batch's generator.
    """

    max_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    stop: tuple[str, ...] = ()
    seed: int | None = None


@dataclass(frozen=True)
class Chunk:
    """What one decoding step added to one request: new text, and why it ended (None while it goes on)."""

    text: str
    finish_reason: str | None
    completion_tokens: int


class _Row:
    """One request's generated tokens and the text handed out so far.

    The text is decoded incrementally: each token decodes only the few tokens since the last stable point (a
    window that starts one decoded piece back, so a tokenizer that spells a piece differently at the start of
    a text is still read in context), not the whole completion: the work per token stays flat as answers grow.
    A token that ends mid-character (byte-level BPE) waits for the next one.
    """

    def __init__(self, sampling: Sampling, eos: set[int], device: torch.device):
        self.sampling, self.eos = sampling, eos
        self.generator = None if sampling.seed is None else torch.Generator(device).manual_seed(sampling.seed)
        self.tokens: list[int] = []
        self.text = ""  # the decoded text of tokens[:read]
        self.prefix = self.read = 0  # tokens[prefix:read] decode to the end of self.text
        self.sent = 0  # characters of the decoded text already returned

    def add(self, token: int, tokenizer: Any) -> Chunk:
        if token in self.eos:
            return self._chunk(self._text(tokenizer, final=True), "stop")
        searched = max(0, len(self.text) - max((len(s) for s in self.sampling.stop), default=0))
        self.tokens.append(token)
        text = self._text(tokenizer, final=len(self.tokens) >= self.sampling.max_tokens)
        for stop in self.sampling.stop:
            at = text.find(stop, searched)  # only where the new text could complete it
            if at >= 0:
                return self._chunk(text[:at], "stop")
        if len(self.tokens) >= self.sampling.max_tokens:
            return self._chunk(text, "length")
        # Hold back any tail that may be the start of a stop string.
        end = len(text)
        for stop in self.sampling.stop:
            for k in range(min(len(stop) - 1, end), 0, -1):
                if text[:end].endswith(stop[:k]):
                    end -= k
                    break
        return self._chunk(text[:end], None)

    def _text(self, tokenizer: Any, final: bool = False) -> str:
        """The text so far: the stable text plus what the tokens after it decode to, once they make whole
        characters (or ``final``: the completion ends here, whatever it holds)."""
        window = tokenizer.decode(self.tokens[self.prefix :], skip_special_tokens=True)
        before = tokenizer.decode(self.tokens[self.prefix : self.read], skip_special_tokens=True)
        if final:
            return self.text + window[len(before) :]
        if len(window) > len(before) and not window.endswith("\ufffd"):
            self.text += window[len(before) :]
            self.prefix, self.read = self.read, len(self.tokens)
        return self.text

    def _chunk(self, text: str, finish_reason: str | None) -> Chunk:
        start, self.sent = self.sent, max(self.sent, len(text))
        return Chunk(text[start:], finish_reason, len(self.tokens))


def eos_ids(model: Any, tokenizer: Any) -> set[int]:
    """Every token id that ends a completion: the tokenizer's EOS and the generation config's."""
    ids = {tokenizer.eos_token_id}
    configured = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    ids.update(configured if isinstance(configured, list) else [configured])
    return {i for i in ids if i is not None}


class DecodeBatch:
    """Rows generating together, one token per row per :meth:`step`; new rows join between steps.

    This is continuous batching: :meth:`add` runs the new prompts' prefill, then merges their key/value cache
    into the running batch's (left-padded to a common length), so a request never waits for a batch to end.
    :meth:`add` is all or nothing: it changes the batch only once everything has been computed, so one that
    raises (a bad prompt, an adapter that is not loaded) leaves the running rows exactly as they were. A
    :meth:`step` that raises leaves the batch unusable (its cache may hold half the step).
    Each row has its own adapter (:data:`BASE` for none; needs a PEFT model), sampling settings (a seeded row
    samples from its own generator), stop strings and token budget; a row that finishes leaves the batch and
    its cache at once.
    """

    def __init__(self, model: Any, tokenizer: Any, generator: torch.Generator | None = None):
        self.model, self.tokenizer, self.generator = model, tokenizer, generator
        self.device = next(model.parameters()).device
        self.eos = eos_ids(model, tokenizer)
        self.keys: list[Any] = []  # the caller's key of each row, in batch order
        self.rows: list[_Row] = []
        self.names: list[str] | None = None
        self.cache: Any = None
        self.mask = self.positions = self.tokens = torch.empty(0)

    def __len__(self) -> int:
        return len(self.rows)

    @torch.inference_mode()
    def add(
        self, keys: Sequence[Any], prompts: Sequence[Sequence[int]], sampling: Sequence[Sampling],
        adapters: Sequence[str] | None = None,
    ) -> dict[Any, Chunk]:  # fmt: skip
        """Prefill new rows and merge them in; returns each new row's first chunk (it may already be final).

        Raises (leaving the batch as it was): ValueError for an empty prompt or a token id outside the model's
        vocabulary; whatever the forward pass raises, e.g. for an adapter that is not loaded.
        """
        from transformers import DynamicCache

        self._check(prompts)
        width = max(len(p) for p in prompts)
        ids = torch.zeros((len(prompts), width), dtype=torch.long)  # padding ids are masked out: any id will do
        mask = torch.zeros((len(prompts), width), dtype=torch.long)
        for i, prompt in enumerate(prompts):  # left padding: every row's next token goes in the last column
            ids[i, width - len(prompt) :] = torch.tensor(prompt, dtype=torch.long)
            mask[i, width - len(prompt) :] = 1
        ids, mask = ids.to(self.device), mask.to(self.device)
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        cache = DynamicCache(config=self.model.config)
        names = list(adapters) if adapters is not None else None
        rows = [_Row(s, self.eos, self.device) for s in sampling]  # before the forward: a bad seed costs nothing
        logits = self._forward(ids, mask, positions, cache, names)
        tokens = sample(logits, sampling, self.generator, [r.generator for r in rows])
        chunks = self._chunks(list(keys), rows, tokens.tolist())
        going = [i for i, key in enumerate(keys) if chunks[key].finish_reason is None]  # rows done at once stay out
        if not going:
            return chunks
        if len(going) < len(rows):
            index = torch.tensor(going, dtype=torch.long, device=self.device)
            cache.batch_select_indices(index)
            mask, positions, tokens = mask[index], positions[index], tokens[index]
        old = len(self.rows)
        layers, mask = self._merged(cache, mask)
        positions = torch.cat([self.positions.to(self.device, torch.long), positions[:, -1:] + 1])
        tokens = torch.cat([self.tokens.to(self.device, torch.long), tokens])
        if names is not None or self.names is not None:
            names = (self.names or [BASE] * old) + [(names or [BASE] * len(rows))[i] for i in going]
        # Everything is computed: commit (plain assignments, which cannot fail half-way).
        if old:
            for layer, (layer_keys, layer_values) in zip(self.cache.layers, layers, strict=True):
                layer.keys, layer.values = layer_keys, layer_values
        else:
            self.cache = cache
        self.mask, self.positions, self.tokens, self.names = mask, positions, tokens, names
        self.keys, self.rows = self.keys + [keys[i] for i in going], self.rows + [rows[i] for i in going]
        return chunks

    @torch.inference_mode()
    def step(self) -> dict[Any, Chunk]:
        """One token for every row; returns each row's chunk."""
        mask = torch.cat([self.mask, self.mask.new_ones((len(self.rows), 1))], dim=1)
        logits = self._forward(self.tokens[:, None], mask, self.positions, self.cache, self.names)
        tokens = sample(logits, [r.sampling for r in self.rows], self.generator, [r.generator for r in self.rows])
        self.mask, self.positions, self.tokens = mask, self.positions + 1, tokens
        chunks = self._chunks(self.keys, self.rows, tokens.tolist())
        self.drop({key for key, chunk in chunks.items() if chunk.finish_reason is not None})
        return chunks

    def drop(self, keys: set[Any]) -> None:
        """Remove rows (finished, or their caller is gone) from the batch and its cache."""
        keep = [i for i, key in enumerate(self.keys) if key not in keys]
        if len(keep) == len(self.keys):
            return
        index = torch.tensor(keep, dtype=torch.long, device=self.device)
        self.cache.batch_select_indices(index)
        self.mask, self.positions, self.tokens = self.mask[index], self.positions[index], self.tokens[index]
        self.keys, self.rows = [self.keys[i] for i in keep], [self.rows[i] for i in keep]
        self.names = [self.names[i] for i in keep] if self.names is not None else None
        padding = int((self.mask.sum(0) == 0).long().cumprod(0).sum())  # leading columns no row uses any more
        if padding and keep:
            self.mask = self.mask[:, padding:]
            for layer in self.cache.layers:
                layer.keys, layer.values = layer.keys[..., padding:, :], layer.values[..., padding:, :]

    def _forward(self, ids: torch.Tensor, mask: torch.Tensor, positions: torch.Tensor, cache: Any,
                 names: list[str] | None) -> torch.Tensor:  # fmt: skip
        kwargs = {"input_ids": ids, "attention_mask": mask, "position_ids": positions[:, -ids.shape[1] :],
                  "past_key_values": cache, "use_cache": True, "logits_to_keep": 1}  # fmt: skip
        extra, context = route_adapters(self.model, names)
        with context:
            return self.model(**kwargs, **extra).logits[:, -1, :].float()

    def _check(self, prompts: Sequence[Sequence[int]]) -> None:
        """Refuse what the forward pass would choke on (an out-of-range id is a device-side assert on CUDA)."""
        vocabulary = self.model.get_input_embeddings().num_embeddings
        for prompt in prompts:
            if not prompt:
                raise ValueError("an empty prompt cannot be decoded: it needs at least one token")
            bad = next((token for token in prompt if not 0 <= token < vocabulary), None)
            if bad is not None:
                raise ValueError(f"token id {bad} is outside the model's vocabulary of {vocabulary}")

    def _merged(self, cache: Any, mask: torch.Tensor) -> tuple[list[tuple[torch.Tensor, torch.Tensor]], torch.Tensor]:
        """The batch's per-layer keys and values and its mask with the new rows' appended, left-padding the
        shorter side; new tensors, the batch itself unchanged. The new rows' own when the batch is empty."""
        if not self.rows:
            return [(layer.keys, layer.values) for layer in cache.layers], mask
        old, new = self.mask.shape[1], mask.shape[1]
        width = max(old, new)

        def joined(mine: torch.Tensor, theirs: torch.Tensor, dim: int) -> torch.Tensor:
            return torch.cat([_left_pad(mine, width - old, dim), _left_pad(theirs, width - new, dim)])

        layers = [(joined(mine.keys, theirs.keys, 2), joined(mine.values, theirs.values, 2))
                  for mine, theirs in zip(self.cache.layers, cache.layers, strict=True)]  # fmt: skip
        return layers, joined(self.mask, mask, 1)

    def _chunks(self, keys: Sequence[Any], rows: Sequence[_Row], tokens: list[int]) -> dict[Any, Chunk]:
        return {key: row.add(token, self.tokenizer) for key, row, token in zip(keys, rows, tokens, strict=True)}


def route_adapters(model: Any, names: Sequence[str] | None) -> tuple[dict[str, Any], Any]:
    """The forward arguments and context that give each row its adapter, by the fastest path that is right.

    One adapter for every row: it is merged into the base weights (a plain model's speed; LoRA layers add about
    a third to a CPU step here), and stays merged for the next batches. Rows on different adapters: PEFT's
    mixed-adapter batch (``adapter_names``), after unmerging. Every row on :data:`BASE`: adapters disabled.
    """
    if names is None:
        return {}, contextlib.nullcontext()
    distinct = set(names)
    merged = merged_adapters(model)
    if len(distinct) == 1 and distinct != {BASE}:
        (name,) = distinct
        if merged != [name]:
            if merged:
                model.unmerge_adapter()
            model.set_adapter(name)
            model.merge_adapter()
        return {}, contextlib.nullcontext()
    if merged:
        model.unmerge_adapter()
    if distinct == {BASE}:
        return {}, model.disable_adapter()
    return {"adapter_names": list(names)}, contextlib.nullcontext()


def merged_adapters(model: Any) -> list[str]:
    """The adapters merged into the base weights of a PEFT model (all LoRA layers agree); [] for none."""
    if model not in _LORA_LAYER:  # found once: walking every module each step would cost milliseconds
        from peft.tuners.lora import LoraLayer

        _LORA_LAYER[model] = next((m for m in model.modules() if isinstance(m, LoraLayer)), None)
    layer = _LORA_LAYER[model]
    return list(layer.merged_adapters) if layer is not None else []


_LORA_LAYER: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _left_pad(tensor: torch.Tensor, size: int, dim: int) -> torch.Tensor:
    if size == 0:
        return tensor
    shape = list(tensor.shape)
    shape[dim] = size
    return torch.cat([tensor.new_zeros(shape), tensor], dim=dim)


def decode(
    model: Any,
    tokenizer: Any,
    prompts: Sequence[Sequence[int]],
    sampling: Sequence[Sampling],
    adapters: Sequence[str] | None = None,
    generator: torch.Generator | None = None,
) -> Iterator[list[Chunk | None]]:
    """Generate for a fixed set of prompts, yielding one item per prompt per step.

    Each item is the step's :class:`Chunk` for that prompt, or None once its final chunk (the one with a
    ``finish_reason``) has been yielded. ``adapters`` names each row's adapter (:data:`BASE` for none).
    """
    batch = DecodeBatch(model, tokenizer, generator)
    chunks = batch.add(range(len(prompts)), prompts, sampling, adapters)
    while True:
        yield [chunks.get(i) for i in range(len(prompts))]
        if not batch:
            return
        chunks = batch.step()


def sample(
    logits: torch.Tensor, sampling: Sequence[Sampling], generator: torch.Generator | None,
    own: Sequence[torch.Generator | None] | None = None,
) -> torch.Tensor:  # fmt: skip
    """One token per row: greedy where the temperature is 0, else nucleus sampling at the row's settings.

    ``own`` gives rows a generator of their own (None: the shared ``generator``); a row draws from its own
    alone, so what it samples does not depend on the other rows.
    """
    greedy = logits.argmax(dim=-1)
    temperature = torch.tensor([s.temperature for s in sampling], device=logits.device)
    if bool((temperature == 0).all()):
        return greedy
    probs = torch.softmax(logits / temperature.clamp(min=1e-5)[:, None], dim=-1)
    top_p = torch.tensor([s.top_p for s in sampling], device=logits.device)
    if bool((top_p < 1).any()):
        sorted_probs, order = probs.sort(dim=-1, descending=True)
        outside = sorted_probs.cumsum(-1) - sorted_probs > top_p[:, None]  # the most likely token always stays
        sorted_probs = sorted_probs.masked_fill(outside, 0)
        probs = torch.zeros_like(probs).scatter(-1, order, sorted_probs)
    own = list(own) if own is not None else [None] * len(sampling)
    shared = [i for i, row in enumerate(own) if row is None]
    if len(shared) == len(own):
        drawn = torch.multinomial(probs, 1, generator=generator).squeeze(-1)
    else:
        drawn = greedy.clone()
        if shared:
            drawn[shared] = torch.multinomial(probs[shared], 1, generator=generator).squeeze(-1)
        for i, row in enumerate(own):
            if row is not None and sampling[i].temperature > 0:
                drawn[i] = torch.multinomial(probs[i : i + 1], 1, generator=row)[0, 0]
    return torch.where(temperature == 0, greedy, drawn)


def generate_text(
    model: Any, tokenizer: Any, prompts: Sequence[str], sampling: Sampling, adapters: Sequence[str] | None = None
) -> list[str]:
    """Whole completions for a batch of prompt strings (evaluation's path through :func:`decode`)."""
    encoded = [encode_prompt(tokenizer, p) for p in prompts]
    texts = [""] * len(prompts)
    for chunks in decode(model, tokenizer, encoded, [sampling] * len(prompts), adapters):
        for i, chunk in enumerate(chunks):
            if chunk is not None:
                texts[i] += chunk.text
    return texts
