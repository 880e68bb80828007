"""Requests exactly as LLaVA's and FastChat's clients send them, recorded from their source.

Each shape names the file it comes from. FastChat's were recorded from fschat 0.2.36 run against
llava-serve on the bundled model (docs/compatibility.md); LLaVA's from haotian-liu/LLaVA's source
(the same files as its PyPI release llava-torch 1.2.2.post1).
"""

from __future__ import annotations

from typing import Any

# -- LLaVA: llava/serve/test_message.py, with llava/conversation.py's default_conversation (conv_vicuna_v1)
# It appends the user turn only (no open assistant turn), so the prompt ends with the separator " ".
LLAVA_VICUNA_V1_SYSTEM = (
    "A chat between a curious user and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the user's questions."
)
LLAVA_TEST_MESSAGE_HEADERS = {"User-Agent": "LLaVA Client"}


def llava_test_message(model: str, message: str = "Tell me a story with more than 1000 words.") -> dict[str, Any]:
    return {
        "model": model,
        "prompt": f"{LLAVA_VICUNA_V1_SYSTEM} USER: {message} ",
        "max_new_tokens": 32,
        "temperature": 0.7,
        "stop": " ",  # conv.sep
    }


def llava_test_message_output(text: str) -> str:
    """What test_message prints last: the final frame's text split on conv.sep, last piece."""
    return text.split(" ")[-1]


# -- FastChat 0.2.36: fastchat/serve/test_message.py; get_conversation_template("llava-shapes") is
# FastChat's own vicuna_v1.1 (stop_str and stop_token_ids None)
FASTCHAT_TEST_MESSAGE_HEADERS = {"User-Agent": "FastChat Client"}


def fastchat_test_message(model: str, message: str = "Describe the image.") -> dict[str, Any]:
    return {
        "model": model,
        "prompt": f"{LLAVA_VICUNA_V1_SYSTEM} USER: {message} ASSISTANT:",
        "temperature": 0.0,
        "max_new_tokens": 32,
        "stop": None,
        "stop_token_ids": None,
        "echo": False,
    }


# -- FastChat 0.2.36: fastchat/serve/openai_api_server.py. Per chat request it posts, in order:
# controller /list_models (check_model), controller /get_worker_address {"model"},
# worker /worker_get_conv_template {"model"} (once per worker), worker /model_details {"model"},
# worker /count_token {"model", "prompt"} (check_length: no images), then worker /worker_generate
# (stream=False) or /worker_generate_stream with get_gen_params' body. Recorded for the bundled model
# (its conversation from our /worker_get_conv_template): the image chat's prompt carries FastChat's
# placeholder `$$<image>$$` and its images the data: URLs as the client sent them.
FASTCHAT_API_HEADERS = {"User-Agent": "FastChat API Server"}
LLAVA_V1_SYSTEM = (
    "A chat between a curious human and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the human's questions."
)


def fastchat_api_gen_params(model: str, image_url: str | None, max_new_tokens: int = 32) -> dict[str, Any]:
    text = "What colour is the shape?" if image_url else "Describe the image."
    body: dict[str, Any] = {
        "model": model,
        "prompt": f"{LLAVA_V1_SYSTEM} USER: {'$$<image>$$' if image_url else ''}{text} ASSISTANT:",
        "temperature": 0.0,
        "logprobs": None,
        "top_p": 1.0,
        "top_k": -1,
        "presence_penalty": 0.0,
        "frequency_penalty": 0.0,
        "max_new_tokens": max_new_tokens,
        "echo": False,
        "stop_token_ids": [2],
    }
    if image_url:
        body["images"] = [image_url]
    return {**body, "stop": ["</s>"]}


def fastchat_api_embeddings(model: str, texts: list[str]) -> dict[str, Any]:
    """create_embeddings' payload to /worker_get_embeddings (batches of WORKER_API_EMBEDDING_BATCH_SIZE)."""
    return {"model": model, "input": texts, "encoding_format": None}


# -- FastChat 0.2.36: fastchat/serve/base_model_worker.py register_to_controller
def fastchat_register(worker_name: str, model: str, multimodal: bool) -> dict[str, Any]:
    status = {"model_names": [model], "speed": 1, "queue_length": 0}
    return {"worker_name": worker_name, "check_heart_beat": True, "worker_status": status, "multimodal": multimodal}
