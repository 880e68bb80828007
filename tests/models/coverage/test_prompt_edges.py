"""Issue 17 items 7, 9, 10: BOS on the chat-template path, a processor that refuses a prompt, no torchvision."""

from __future__ import annotations

import subprocess
import sys

import pytest
from PIL import Image

from llava_serve.errors import InvalidRequest
from llava_serve.models.hf import wrap_hf_model
from llava_serve.tools.checkpoints.hf import build_tokenizer

TEMPLATE_WITH_BOS = "{{ bos_token }}{% for m in messages %}{{ m['role'] }}: {{ m['content'][0]['text'] }}\n{% endfor %}"


class TinyModel:
    config = type("Config", (), {"model_type": "llama", "max_position_embeddings": 64})()
    generation_config = None


def tokenizer(adds_bos: bool):
    tok = build_tokenizer(512)
    if not adds_bos:  # as Gemma 3's tokenizer.json: BOS comes from the template only
        tok.backend_tokenizer.post_processor = None
    tok.chat_template = TEMPLATE_WITH_BOS
    return tok


@pytest.mark.parametrize("adds_bos", [True, False], ids=["tokenizer adds BOS", "template only"])
def test_template_bos_tokenizes_to_exactly_one(adds_bos):
    tok = tokenizer(adds_bos)
    lm = wrap_hf_model(TinyModel(), tok, None, "tiny")
    messages = [{"role": "user", "content": [{"type": "text", "text": "the red circle"}]}]
    ids = lm.encode(lm.build_prompt(messages, add_generation_prompt=False), []).input_ids
    expected = tok.apply_chat_template(messages, tokenize=True, return_dict=True)["input_ids"]
    assert ids == list(expected) and ids.count(tok.bos_token_id) == 1


class RefusingProcessor:
    """Stands in for PaliGemma's processor, which raises ValueError on a prompt it cannot take."""

    image_token = "<image>"
    tokenizer = None

    def __call__(self, **kwargs):
        raise ValueError("this model needs at least one image")


def test_a_processor_refusal_is_an_invalid_request():
    tok = build_tokenizer(512)
    model = TinyModel()
    model.config = type("Config", (), {"model_type": "paligemma", "vision_config": object(), "image_token_id": 5})()
    lm = wrap_hf_model(model, tok, RefusingProcessor(), "tiny")
    with pytest.raises(InvalidRequest, match="processor refused this prompt: this model needs at least one image"):
        lm.encode("describe", [])
    assert InvalidRequest.http_status == 400


def test_worker_without_torchvision_exits_2_with_the_fix(checkpoint):
    pytest.importorskip("PIL")
    from transformers.utils import is_torchvision_available

    if is_torchvision_available():
        pytest.skip("torchvision is installed")
    path = str(checkpoint("pixtral"))
    cmd = [sys.executable, "-m", "llava_serve.model_worker", "--model-path", path, "--no-register", "--device", "cpu"]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert done.returncode == 2, done.stderr[-2000:]
    assert "needs torchvision" in done.stderr and "llava-serve[vision]" in done.stderr
    assert "Traceback" not in done.stderr


def test_images_are_nested_per_prompt_as_apply_chat_template_passes_them(served):
    """LLaVA-OneVision tiles an image only when it is the only one of its prompt (transformers: 49 tokens
    for two small images, not two tiled runs)."""
    lm = served("llava_onevision")
    pics = [Image.new("RGB", (80, 30), (200, 0, 0)), Image.new("RGB", (30, 90), (0, 0, 200))]
    two = lm.encode("<image><image>hi", pics).input_ids.count(lm.image_token_id)
    one = lm.encode("<image>hi", pics[:1]).input_ids.count(lm.image_token_id)
    assert two < 2 * one
