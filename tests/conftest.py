"""Shared fixtures: a tiny word-level tokenizer with known ids, a tiny phi-2-shaped model, an in-memory store."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

# Tests never reach a model or dataset hub: fail at once instead of waiting on the network.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

REPO = Path(__file__).resolve().parents[1]
SEED_DATA = REPO.parent / "shared" / "seed-data"

EOS = "<|endoftext|>"
WORDS = [
    "GALAXY",
    "ALIBABA",
    "GENERAL",
    "<",
    ">",
    "?",
    ".",
    ",",
    ":",
    ";",
    "!",
    "'",
    "-",
    "what",
    "is",
    "the",
    "a",
    "an",
    "of",
    "to",
    "in",
    "and",
    "who",
    "where",
    "when",
    "how",
    "why",
    "galaxy",
    "alibaba",
    "cloud",
    "store",
    "hello",
    "world",
    "fine",
    "thanks",
    "answer",
    "question",
    "context",
    "alloy",
    "strength",
    "yield",
    "temperature",
    "GPa",
    "K",
    "was",
    "annealed",
    "at",
    "its",
    "has",
    "ray",
    "train",
    "tune",
    "serve",
    "model",
    "adapter",
    "rank",
    "lr",
    "Question",
    "Answer",
    "###",
    "Instruction",
    "Input",
    "Response",
    "summarise",
    "this",
    "text",
    "please",
    "name",
    "colour",
    "sky",
    "blue",
    "user",
    "assistant",
    "system",
    "you",
    "are",
    "helpful",
    "1",
    "2",
    "3",
    "4",
    "5",
    "6",
    "7",
    "8",
    "9",
    "0",
]


def word_vocab() -> dict[str, int]:
    """Token ids of the tiny tokenizer: EOS is 0, unknown words 1, then WORDS in order."""
    vocab = {EOS: 0, "<unk>": 1}
    for word in WORDS:
        vocab.setdefault(word, len(vocab))
    return vocab


def build_tiny_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.WordLevel(vocab=word_vocab(), unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=backend, eos_token=EOS, unk_token="<unk>")


@pytest.fixture(scope="session")
def tiny_tokenizer():
    return build_tiny_tokenizer()


@pytest.fixture(scope="session")
def tiny_phi_dir(tmp_path_factory) -> Path:
    """A randomly initialised PhiForCausalLM with phi-2's module names, saved with its tokenizer."""
    import torch
    from transformers import PhiConfig, PhiForCausalLM

    directory = tmp_path_factory.mktemp("tiny-phi")
    tokenizer = build_tiny_tokenizer()
    config = PhiConfig(
        vocab_size=128,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=256,
        eos_token_id=0,
        bos_token_id=0,
    )
    torch.manual_seed(0)
    PhiForCausalLM(config).save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


@pytest.fixture
def seed_data() -> Path:
    if not SEED_DATA.is_dir():
        pytest.skip(f"seed data not present at {SEED_DATA}")
    return SEED_DATA


@pytest.fixture
def memory_location():
    """A fresh ``memory://`` location: fsspec's in-memory store, which like an object store renames no directory
    and takes no lock. It lives in this process only, and is emptied after the test."""
    import uuid

    import fsspec

    location = f"memory://test-{uuid.uuid4().hex[:12]}"
    yield location
    store = fsspec.filesystem("memory")
    if store.exists(location):
        store.rm(location, recursive=True)
