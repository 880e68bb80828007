"""--load-8bit / --load-4bit on CPU with bitsandbytes: the language model is quantized, the vision
tower, projector and lm_head stay full precision, and the serving path still equals generate."""

from __future__ import annotations

import warnings

import bitsandbytes as bnb
import pytest
import torch

from llava_serve.models.loader import LoadOptions, load_model
from tests.models.greedy import generate_greedy, serving_greedy
from tests.models.helpers import user

BNB_TYPE = {"load_8bit": bnb.nn.Linear8bitLt, "load_4bit": bnb.nn.Linear4bit}


def check_quantized(lm, mode: str) -> None:
    model = lm.model
    lm_linears = [m for n, m in model.named_modules() if n.startswith("model.language_model.") and "proj" in n]
    assert lm_linears and all(isinstance(m, BNB_TYPE[mode]) for m in lm_linears)
    kept = [model.lm_head, *model.model.multi_modal_projector.modules(), *model.model.vision_tower.modules()]
    linears = [m for m in kept if isinstance(m, torch.nn.Linear)]
    assert linears and all(type(m) is torch.nn.Linear for m in linears)
    full = [
        model.lm_head.weight,
        *model.model.vision_tower.parameters(),
        *model.model.multi_modal_projector.parameters(),
    ]
    assert all(p.dtype == torch.float32 for p in full)


def check_generates(lm, images) -> None:
    for messages, imgs in (([user("What is it?", 1)], images[:1]), ([user("Say hi.")], [])):
        prompt = lm.build_prompt(messages)
        out = generate_greedy(lm, prompt, imgs, 8)
        assert out and serving_greedy(lm, prompt, imgs, 8) == out


@pytest.mark.parametrize("mode", ["load_8bit", "load_4bit"])
@pytest.mark.parametrize("kind", ["original", "original-lora"])
def test_original_checkpoint_quantized(load_original, images, kind, mode):
    lm = load_original(kind, **{mode: True})
    check_quantized(lm, mode)
    check_generates(lm, images)
    assert lm.model.get_memory_footprint() < load_original(kind).model.get_memory_footprint()


@pytest.mark.parametrize("mode", ["load_8bit", "load_4bit"])
def test_hf_llava_quantized(tiny_llava, images, mode):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        lm = load_model(LoadOptions(model_path=str(tiny_llava), device="cpu", **{mode: True}))
    check_quantized(lm, mode)
    check_generates(lm, images)


def test_4bit_is_nf4_with_double_quantization(load_original):
    quant = load_original("original", load_4bit=True).model.config.quantization_config
    assert quant.load_in_4bit and quant.bnb_4bit_quant_type == "nf4" and quant.bnb_4bit_use_double_quant


def _stderr_of(code: str) -> str:
    import subprocess
    import sys

    setup = "import logging; logging.basicConfig(level=logging.WARNING)\n"
    done = subprocess.run([sys.executable, "-c", setup + code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    return done.stderr


def test_4bit_loading_does_not_print_the_kernels_hint():
    """bitsandbytes warns "pip install kernels" at import on AVX-512 BF16 CPUs (it cannot fetch a Hub
    kernel); the loader drops that line, since its built-in CPU kernel is used either way."""
    pytest.importorskip("bitsandbytes")
    if "pip install kernels" not in _stderr_of("import bitsandbytes"):
        pytest.skip("bitsandbytes does not print the hint on this CPU")
    stderr = _stderr_of(
        "import torch\n"
        "from llava_serve.models.quant import quantization_config\n"
        "quantization_config(False, True, torch.device('cpu'), torch.float32)\n"
    )
    assert "pip install kernels" not in stderr
