"""oneDNN-prepacked linear layers: same results as nn.Linear, swapped only where they apply."""

from __future__ import annotations

import pytest
import torch

from llava_serve.engine.prepack import PackedLinear, prepack_available, prepack_linears

pytestmark = pytest.mark.skipif(not torch.backends.mkldnn.is_available(), reason="no oneDNN in this torch build")


class Quantized(torch.nn.Linear):  # stands for bitsandbytes' layers, which subclass nn.Linear
    pass


def small_model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(
        torch.nn.Linear(64, 96), torch.nn.GELU(), torch.nn.Linear(96, 32, bias=False), Quantized(32, 8)
    )


def test_packed_linear_matches_linear_for_any_row_count() -> None:
    linear = small_model()[0]
    packed = PackedLinear(linear, rows_hint=8)
    with torch.inference_mode():
        for shape in [(1, 64), (1, 1, 64), (3, 64), (8, 64), (2, 5, 64), (33, 64)]:
            x = torch.randn(*shape)
            got, want = packed(x), linear(x)
            assert got.shape == want.shape
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
            if x.numel() == 64:  # one row: the original weight, bit for bit
                assert torch.equal(got, want)
        strided = torch.randn(64, 6).t()  # not contiguous
        torch.testing.assert_close(packed(strided), linear(strided), rtol=1e-5, atol=1e-5)


def test_prepack_swaps_plain_float32_linears_only() -> None:
    model = small_model()
    x = torch.randn(4, 64)
    with torch.inference_mode():
        before = model(x)
        assert prepack_linears(model, rows_hint=4) == 2
        assert [type(m).__name__ for m in model] == ["PackedLinear", "GELU", "PackedLinear", "Quantized"]
        torch.testing.assert_close(model(x), before, rtol=1e-5, atol=1e-5)
        assert prepack_linears(model, rows_hint=4) == 0  # already done
    assert prepack_linears(small_model().to(torch.bfloat16), rows_hint=4) == 0
    assert not prepack_available(small_model().to(torch.float16))


def test_training_mode_gradients_go_through_the_original_weight() -> None:
    linear = small_model()[0]
    packed = PackedLinear(linear, rows_hint=4)
    packed(torch.randn(4, 64)).sum().backward()
    assert linear.weight.grad is not None and linear.weight.grad.abs().sum() > 0
