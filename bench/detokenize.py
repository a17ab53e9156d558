"""Detokenizing a completion token by token: the generator's incremental decode against decoding it whole.

    .venv/bin/python bench/detokenize.py

The starter model's tokenizer (byte-level BPE). A completion of N tokens (English with accents, CJK and emoji)
is fed one token at a time to ``qlora_ray.generate._Row`` (what every generated row does), against the way it
was done before: the whole completion decoded again at each token. Reported: microseconds per token, averaged
over the completion and at its last token, for N = 128, 512 and 2048.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

LENGTHS = [128, 512, 2048]
TEXT = 'Ray Serve \u2603 d\u00e9j\u00e0 vu \u6771\u4eac \U0001f600 and "quotes", spaces  .  end\n'


def main() -> int:
    import torch

    from qlora_ray.config import ModelConfig
    from qlora_ray.generate import Sampling, _Row
    from qlora_ray.model import load_tokenizer

    tokenizer = load_tokenizer(ModelConfig(name_or_path="builtin:smollm2-135m-instruct"))
    ids = tokenizer(TEXT * 200, add_special_tokens=False)["input_ids"]
    print("| tokens | whole decode per token: mean / last (us) | incremental: mean / last (us) | same text |")
    print("| --- | --- | --- | --- |")
    for n in LENGTHS:
        tokens = ids[:n]
        row, times = _Row(Sampling(max_tokens=n + 1), set(), torch.device("cpu")), []
        text = ""
        for token in tokens:
            started = time.perf_counter()
            text += row.add(token, tokenizer).text
            times.append(time.perf_counter() - started)
        whole = []
        for k in range(1, n + 1):
            started = time.perf_counter()
            tokenizer.decode(tokens[:k], skip_special_tokens=True)
            whole.append(time.perf_counter() - started)
        same = text + row._text(tokenizer, final=True)[len(text):] == tokenizer.decode(tokens, skip_special_tokens=True)
        print(f"| {n} | {1e6 * sum(whole) / n:.1f} / {1e6 * whole[-1]:.1f} | "
              f"{1e6 * sum(times) / n:.1f} / {1e6 * times[-1]:.1f} | {same} |")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
