from collections import Counter

from data.formats import load_examples, new_example
from data.splits import holdout_split, prompt_key


def _rows():
    rows = []
    for tag, n in (("<A>", 80), ("<B>", 15), ("<C>", 5)):
        rows += [new_example(f"f:{tag}{i}", "prompt_completion", "x", prompt=f"{tag}q{i}", tag=tag) for i in range(n)]
    # the same question three times, with different answers
    rows += [new_example(f"f:d{i}", "prompt_completion", f"a{i}", prompt="<A>same question", tag="<A>") for i in range(3)]
    return rows


def test_split_is_stratified_by_tag_and_deterministic():
    rows = _rows()
    train, holdout = holdout_split(rows, 0.2, seed=7)
    assert sorted(train + holdout) == list(range(len(rows)))
    tags = Counter(rows[i]["tag"] for i in holdout)
    assert abs(tags["<A>"] - 0.2 * 83) <= 3 and tags["<B>"] == 3 and tags["<C>"] == 1
    assert holdout_split(rows, 0.2, seed=7) == (train, holdout)
    assert holdout_split(rows, 0.2, seed=8) != (train, holdout)


def test_duplicate_prompts_stay_on_one_side_for_every_seed():
    rows = _rows()
    duplicates = {i for i, r in enumerate(rows) if r["prompt"] == "<A>same question"}
    for seed in range(30):
        train, holdout = holdout_split(rows, 0.3, seed)
        assert duplicates <= set(train) or duplicates <= set(holdout)


def test_prompt_key_ignores_case_but_not_content():
    a = new_example("w", "prompt_completion", "x", prompt="What is Ray?")
    b = new_example("w", "prompt_completion", "y", prompt="what is ray?")
    c = new_example("w", "prompt_completion", "x", prompt="what is serve?")
    assert prompt_key(a) == prompt_key(b) != prompt_key(c)


def test_galaxy_seed_holdout_never_leaks_a_training_question(seed_data):
    examples = load_examples(str(seed_data / "galaxy_alibaba_qa.json")).examples
    train, holdout = holdout_split(examples, 0.1, seed=42)
    assert {prompt_key(examples[i]) for i in train}.isdisjoint(prompt_key(examples[i]) for i in holdout)
    share = Counter(examples[i]["tag"] for i in holdout)
    assert share["<ALIBABA>"] in range(87, 92) and share["<GALAXY>"] in range(14, 19) and share["<GENERAL>"] in (4, 5)
