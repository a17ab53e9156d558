"""The decode loop and adapter set that Serve and evaluation share, on a tiny phi-shaped model."""

from __future__ import annotations

import pytest
import torch
from adapters import make_adapter

from qlora_ray.config import ModelConfig
from qlora_ray.generate import (
    BASE,
    AdapterError,
    AdapterSet,
    DecodeBatch,
    Sampling,
    check_adapter_dir,
    decode,
    generate_text,
    merged_adapters,
    sample,
)


@pytest.fixture(scope="module")
def base(tiny_phi_dir):
    from qlora_ray.generate import load_inference_model

    return load_inference_model(ModelConfig(name_or_path=str(tiny_phi_dir), quantization="nf4"))


def _collect(model, tokenizer, prompts, sampling, adapters=None):
    texts, reasons, counts = [""] * len(prompts), [None] * len(prompts), [0] * len(prompts)
    for chunks in decode(model, tokenizer, prompts, sampling, adapters):
        for i, chunk in enumerate(chunks):
            if chunk is not None:
                assert reasons[i] is None, "a chunk after the final one"
                texts[i] += chunk.text
                reasons[i], counts[i] = chunk.finish_reason, chunk.completion_tokens
    return texts, reasons, counts


def test_cpu_inference_loads_unquantised(base):
    assert not any("4bit" in type(m).__name__ for m in base.modules())
    assert not any(p.requires_grad for p in base.parameters())


def test_batched_greedy_decode_matches_generate_row_by_row(base, tiny_tokenizer):
    # Different prompt lengths in one batch: left padding and positions must not change any row's answer.
    prompts = [[5, 6, 7], [8, 9, 10, 11, 12, 13, 14], [15]]
    eos = tiny_tokenizer.eos_token_id
    expected = []
    for prompt in prompts:
        out = base.generate(torch.tensor([prompt]), max_new_tokens=6, do_sample=False, eos_token_id=eos,
                            pad_token_id=eos)  # fmt: skip
        tokens = [t for t in out[0, len(prompt) :].tolist()]
        expected.append(tokens[: tokens.index(eos)] if eos in tokens else tokens)
    texts, reasons, counts = _collect(base, tiny_tokenizer, prompts, [Sampling(max_tokens=6, temperature=0)] * 3)
    assert texts == [tiny_tokenizer.decode(t) for t in expected]
    assert counts == [len(t) for t in expected]
    assert reasons == ["length" if len(t) == 6 else "stop" for t in expected]


def test_rows_that_join_a_running_batch_answer_as_if_alone(base, tiny_tokenizer):
    greedy = Sampling(max_tokens=8, temperature=0)
    prompts = [[5, 6, 7], [8, 9, 10, 11, 12, 13, 14], [15], [16, 17]]
    alone = [_collect(base, tiny_tokenizer, [p], [greedy])[0][0] for p in prompts]
    batch, texts = DecodeBatch(base, tiny_tokenizer), {i: "" for i in range(4)}

    def take(chunks):
        for key, chunk in chunks.items():
            texts[key] += chunk.text

    take(batch.add([0], [prompts[0]], [greedy]))
    take(batch.step())
    take(batch.add([1], [prompts[1]], [greedy]))  # a longer prompt joins: the running rows are left-padded
    take(batch.step())
    take(batch.add([2, 3], prompts[2:], [greedy, greedy]))  # shorter ones join: they are left-padded
    take(batch.step())
    batch.drop({1})  # its caller went away: the others go on, and the padding only it needed is trimmed
    while batch:
        take(batch.step())
    assert [texts[0], texts[2], texts[3]] == [alone[0], alone[2], alone[3]]
    assert alone[1].startswith(texts[1])


def test_rows_end_on_their_own_budget_and_stop_strings(base, tiny_tokenizer):
    prompt = [5, 6, 7]
    free, _, _ = _collect(base, tiny_tokenizer, [prompt], [Sampling(max_tokens=8, temperature=0)])
    words = free[0].split()
    assert len(words) >= 3, "the tiny model ended too early to test stop strings"
    stop = words[2]
    texts, reasons, counts = _collect(
        base, tiny_tokenizer, [prompt, prompt],
        [Sampling(max_tokens=2, temperature=0), Sampling(max_tokens=8, temperature=0, stop=(stop,))],
    )  # fmt: skip
    assert (reasons[0], counts[0]) == ("length", 2) and free[0].startswith(texts[0]) and len(texts[0]) < len(free[0])
    assert reasons[1] == "stop" and texts[1] == free[0][: free[0].index(stop)]


def test_nucleus_sampling_keeps_the_most_likely_token_and_greedy_rows_stay_greedy():
    logits = torch.tensor([[0.0, 5.0, 1.0], [3.0, 0.0, 0.0]])
    rows = [Sampling(max_tokens=1, temperature=1.0, top_p=0.01), Sampling(max_tokens=1, temperature=0)]
    generator = torch.Generator().manual_seed(0)
    for _ in range(20):
        assert sample(logits, rows, generator).tolist() == [1, 0]
    hot = [Sampling(max_tokens=1, temperature=2.0)]
    drawn = {sample(logits[:1], hot, generator).item() for _ in range(200)}
    assert drawn == {0, 1, 2}  # a high temperature without top_p reaches every token


def test_a_mixed_adapter_batch_answers_each_row_as_its_adapter_alone(base, tiny_phi_dir, tiny_tokenizer, tmp_path):
    adapters = AdapterSet(base)
    for seed in (1, 2):
        adapters.load(f"a{seed}", make_adapter(tiny_phi_dir, tmp_path / f"a{seed}", seed))
    prompt, greedy = [5, 6, 7, 8], Sampling(max_tokens=6, temperature=0)
    alone = {
        name: _collect(adapters.model, tiny_tokenizer, [prompt], [greedy], [name])[0][0] for name in ("a1", "a2", BASE)
    }
    assert len(set(alone.values())) == 3, "the adapters must change the output for this test to mean anything"
    assert merged_adapters(adapters.model) == []  # the last one alone ran on the base: a2 was unmerged for it
    names = ["a2", BASE, "a1", "a2"]
    mixed, _, _ = _collect(adapters.model, tiny_tokenizer, [prompt] * 4, [greedy] * 4, names)
    assert mixed == [alone[n] for n in names]  # merged (one adapter) and mixed-batch paths agree
    _collect(adapters.model, tiny_tokenizer, [prompt], [greedy], ["a1"])
    assert merged_adapters(adapters.model) == ["a1"]  # one adapter for the whole batch: merged into the base
    assert generate_text(adapters.model, tiny_tokenizer, ["GALAXY"], greedy, ["a1"]) == generate_text(
        adapters.model, tiny_tokenizer, ["GALAXY"], greedy, ["a1"]
    )

    adapters.unload("a2")
    assert adapters.names == {"a1"}
    adapters.unload("a1")  # the last one: the model goes back to the plain base
    assert adapters.peft is None
    plain, _, _ = _collect(adapters.model, tiny_tokenizer, [prompt], [greedy])
    assert plain[0] == alone[BASE]


def test_only_safetensors_lora_adapters_load(tiny_phi_dir, tmp_path):
    directory = make_adapter(tiny_phi_dir, tmp_path / "a", 1)
    check_adapter_dir(directory)
    weights = directory / "adapter_model.safetensors"
    weights.rename(directory / "adapter_model.bin")
    with pytest.raises(AdapterError, match=r"no adapter_model\.safetensors .*safetensors only"):
        check_adapter_dir(directory)
    with pytest.raises(AdapterError, match="not a PEFT adapter directory"):
        check_adapter_dir(tmp_path)


def _take(texts, chunks):
    for key, chunk in chunks.items():
        texts[key] = texts.get(key, "") + chunk.text
    return chunks


def test_a_failed_add_leaves_the_running_rows_as_they_were(base, tiny_phi_dir, tiny_tokenizer, tmp_path):
    adapters = AdapterSet(base)
    adapters.load("a1", make_adapter(tiny_phi_dir, tmp_path / "a1", 1))
    greedy = Sampling(max_tokens=10, temperature=0)
    prompts, names = [[5, 6, 7], [8, 9, 10, 11]], ["a1", BASE]

    def run(failing_adds):
        batch, texts = DecodeBatch(adapters.model, tiny_tokenizer), {}
        _take(texts, batch.add([0, 1], prompts, [greedy] * 2, names))
        _take(texts, batch.step())
        for key, prompt, sampling, adapter in failing_adds:
            with pytest.raises((ValueError, RuntimeError)):
                batch.add([key], [prompt], [sampling], [adapter])
            assert batch.keys == [0, 1] and len(batch) == 2  # nothing of the failed row stayed
        _take(texts, batch.add([2], [[16, 17, 18, 19, 20, 21]], [greedy], ["a1"]))  # a longer prompt joins
        while batch:
            _take(texts, batch.step())
        return texts

    clean = run([])
    assert all(clean.values()), "the rows must generate text for this test to mean anything"
    failing = [
        (8, [5, 100_000], greedy, "a1"),  # a token id outside the vocabulary
        (9, [5, 6, 7, 8, 9, 10, 11, 12], greedy, "not-loaded"),  # the prefill fails: PEFT knows no such adapter
        (10, [], greedy, "a1"),  # an empty prompt
        (11, [16, 17, 18, 19, 20, 21, 22, 23, 24], Sampling(max_tokens=4, temperature=float("nan")), "a1"),  # sampling
    ]
    assert run(failing) == clean


def test_a_row_that_ends_on_its_first_token_never_joins_the_batch(base, tiny_tokenizer):
    batch = DecodeBatch(base, tiny_tokenizer)
    batch.add([0], [[5, 6, 7]], [Sampling(max_tokens=5, temperature=0)])
    first = batch.add([1], [[8, 9]], [Sampling(max_tokens=1, temperature=0)])
    assert first[1].finish_reason == "length" and batch.keys == [0] and batch.mask.shape[0] == 1


def test_a_seeded_row_samples_the_same_text_alone_or_in_a_batch(base, tiny_tokenizer):
    hot = Sampling(max_tokens=24, temperature=1.0, top_p=1.0, seed=7)
    prompt = [5, 6, 7]
    alone = [_collect(base, tiny_tokenizer, [prompt], [hot])[0][0] for _ in range(2)]
    assert alone[0] == alone[1]
    other_seed = _collect(base, tiny_tokenizer, [prompt], [Sampling(max_tokens=24, temperature=1.0, seed=8)])[0][0]
    assert other_seed != alone[0], "different seeds must sample differently for this test to mean anything"

    # In a batch: an unseeded sampled row runs first, the seeded row joins after a step, and another joins later.
    batch, texts = DecodeBatch(base, tiny_tokenizer, torch.Generator().manual_seed(0)), {}
    _take(texts, batch.add(["other"], [[8, 9, 10, 11]], [Sampling(max_tokens=40, temperature=1.0)]))
    _take(texts, batch.step())
    _take(texts, batch.add(["seeded"], [prompt], [hot]))
    _take(texts, batch.step())
    _take(texts, batch.add(["late"], [[16, 17, 18, 19, 20]], [Sampling(max_tokens=40, temperature=1.0)]))
    while batch:
        _take(texts, batch.step())
    assert texts["seeded"] == alone[0]


def test_rows_without_a_seed_draw_from_the_shared_generator():
    logits = torch.zeros((2, 50))
    hot, seeded = Sampling(max_tokens=1), Sampling(max_tokens=1, seed=3)
    shared = torch.Generator().manual_seed(0)
    before = shared.get_state()
    own = torch.Generator().manual_seed(3)
    drawn = sample(logits, [seeded, seeded], shared, [own, torch.Generator().manual_seed(3)])
    assert torch.equal(shared.get_state(), before)  # seeded rows leave the shared generator alone
    assert drawn[0] == drawn[1]  # two rows with the same seed draw the same
    sample(logits, [hot, seeded], shared, [None, torch.Generator().manual_seed(3)])
    assert not torch.equal(shared.get_state(), before)  # an unseeded row draws from the shared one
    first = sample(logits[:1], [hot], torch.Generator().manual_seed(5))
    assert sample(logits[:1], [hot], torch.Generator().manual_seed(5)) == first


def test_text_is_decoded_incrementally_and_equals_the_whole_decode():
    """The starter model's byte-level BPE: characters split across tokens (emoji, CJK, accents) and spaces the
    tokenizer spells differently at the start of a text come out exactly as decoding everything at once."""
    from qlora_ray.generate import _Row
    from qlora_ray.model import load_tokenizer

    tokenizer = load_tokenizer(ModelConfig(name_or_path="builtin:smollm2-135m-instruct"))
    text = 'Ray Serve \u2603 d\u00e9j\u00e0 vu \u6771\u4eac \U0001f600 and "quotes" , spaces  .  end\n' * 8
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    row = _Row(Sampling(max_tokens=len(ids)), set(), torch.device("cpu"))
    chunks = [row.add(token, tokenizer) for token in ids]
    assert "".join(c.text for c in chunks) == tokenizer.decode(ids, skip_special_tokens=True)
    assert chunks[-1].finish_reason == "length" and all(c.finish_reason is None for c in chunks[:-1])
    assert not any("\ufffd" in c.text for c in chunks)  # half a character is never handed out
    assert row.prefix > len(ids) - 8  # the decode window stays a few tokens long, not the whole completion
    # A stop string that spans several tokens ends the text just before it, wherever it falls.
    stopped = _Row(Sampling(max_tokens=len(ids), stop=("\u6771\u4eac \U0001f600",)), set(), torch.device("cpu"))
    out = []
    for token in ids:
        out.append(stopped.add(token, tokenizer))
        if out[-1].finish_reason:
            break
    assert "".join(c.text for c in out) == text[: text.index("\u6771\u4eac")] and out[-1].finish_reason == "stop"
