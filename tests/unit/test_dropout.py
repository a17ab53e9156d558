"""Skip-sampled LoRA dropout: the same distribution as nn.Dropout, swapped in on CPU only."""

import pytest
import torch

from jobs.dropout import SkipDropout, dropped_positions, use_skip_dropout
from qlora_ray.config import from_dict
from qlora_ray.model import attach_lora, load_model


@pytest.mark.parametrize("p", [0.05, 0.5, 0.9])
def test_each_element_is_dropped_independently_with_probability_p(p):
    torch.manual_seed(0)
    n = 400_000
    mask = torch.zeros(n, dtype=torch.bool)
    positions = dropped_positions(n, p)
    mask[positions] = True
    assert positions.unique().numel() == positions.numel() and int(positions.min()) >= 0 and int(positions.max()) < n
    sigma = (p * (1 - p) / n) ** 0.5
    assert abs(mask.float().mean().item() - p) < 5 * sigma
    # No position is favoured (the tail, reached by a second draw when the first falls short, included),
    # and neighbours are independent: P(both dropped) = p^2.
    for part in mask.chunk(4):
        assert abs(part.float().mean().item() - p) < 5 * 2 * sigma
    both = (mask[1:] & mask[:-1]).float().mean().item()
    assert abs(both - p * p) < 5 * (p * p * (1 - p * p) / n) ** 0.5


def test_short_tensors_need_more_than_one_draw_and_stay_exact():
    torch.manual_seed(1)
    drops = [dropped_positions(3, 0.5) for _ in range(20_000)]
    assert all(d.numel() == 0 or int(d.max()) < 3 for d in drops)
    assert abs(sum(d.numel() for d in drops) / 60_000 - 0.5) < 0.02


def test_skip_dropout_matches_nn_dropout_in_scale_and_in_eval():
    torch.manual_seed(2)
    x = torch.rand(300, 500) + 1.0
    layer = SkipDropout(0.2)
    y = layer(x)
    kept = y != 0
    torch.testing.assert_close(y[kept], x[kept] / 0.8)
    assert abs(y.mean().item() - x.mean().item()) < 0.01  # unbiased, as nn.Dropout
    torch.manual_seed(3)
    first = layer(x)
    torch.manual_seed(3)
    assert torch.equal(first, layer(x))  # seeded: a resumed run redraws the same masks
    layer.eval()
    assert layer(x) is x
    with pytest.raises(ValueError, match=r"\[0, 1\)"):
        SkipDropout(1.0)


def test_swapped_into_every_lora_layer_on_cpu_only(tiny_phi_dir):
    cfg = from_dict(
        {
            "model": {"name_or_path": str(tiny_phi_dir)},
            "lora": {"r": 4, "dropout": 0.1, "target_modules": ["q_proj", "fc1"]},
            "data": {"path": "unused.jsonl"},
        }
    )
    model = attach_lora(load_model(cfg.model), cfg)
    lora_layers = [m for m in model.modules() if isinstance(getattr(m, "lora_dropout", None), torch.nn.ModuleDict)]
    assert use_skip_dropout(model, "cuda:0") == 0
    assert use_skip_dropout(model, "cpu") == len(lora_layers) > 0
    assert all(isinstance(m.lora_dropout["default"], SkipDropout) for m in lora_layers)
    for name, param in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(param)  # zero at init, which would hide the dropout
    model.train()
    ids = torch.tensor([[5, 6, 7, 8]])
    torch.manual_seed(0)
    a = model(input_ids=ids).logits
    torch.manual_seed(1)
    b = model(input_ids=ids).logits
    model.eval()
    assert not torch.equal(a, b) and torch.equal(model(input_ids=ids).logits, model(input_ids=ids).logits)


def test_empty_and_zero_probability_drop_nothing():
    assert dropped_positions(0, 0.5).numel() == 0 and dropped_positions(10, 0.0).numel() == 0
    assert SkipDropout(0.3)(torch.empty(0, 4)).shape == (0, 4)
