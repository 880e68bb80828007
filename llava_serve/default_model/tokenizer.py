"""A small byte-level BPE tokenizer trained on the synthetic dialogue text, and the chat template.

Byte-level BPE covers every byte, so arbitrary user text tokenizes (into short pieces) instead of
failing; the vocabulary of the synthetic questions becomes whole-word tokens.
"""

from __future__ import annotations

import random
from collections.abc import Iterator

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast

from llava_serve.default_model.data import sample_scene
from llava_serve.default_model.questions import GENERATORS, TEXT_ONLY_ANSWER, text_only_qa

BOS, EOS, UNK, PAD, IMAGE = "<s>", "</s>", "<unk>", "<pad>", "<image>"
SPECIAL_TOKENS = [UNK, BOS, EOS, PAD, IMAGE]
VOCAB_SIZE = 768
SYSTEM_PROMPT = (
    "A chat between a curious human and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the human's questions."
)

# Vicuna v1 (LLaVA's conv_vicuna_v1): "{system} USER: <image>\n{q} ASSISTANT: {a}</s>USER: ...".
# BOS is added by the tokenizer's post-processor, not by the template.
CHAT_TEMPLATE = (
    "{%- set ns = namespace(system='" + SYSTEM_PROMPT.replace("'", "\\'") + "') -%}"
    "{%- for message in messages if message['role'] == 'system' -%}"
    "{%- if message['content'] is string -%}{%- set ns.system = message['content'] -%}"
    "{%- else -%}{%- set ns.system = message['content'] | selectattr('type', 'equalto', 'text')"
    " | map(attribute='text') | join(' ') -%}{%- endif -%}"
    "{%- endfor -%}"
    "{{- ns.system + ' ' -}}"
    "{%- for message in messages if message['role'] != 'system' -%}"
    "{{- 'USER: ' if message['role'] == 'user' else 'ASSISTANT: ' -}}"
    "{%- if message['content'] is string -%}{{- message['content'] -}}"
    "{%- else -%}"
    "{%- for part in message['content'] if part['type'] in ['image', 'image_url'] -%}{{- '<image>\n' -}}"
    "{%- endfor -%}"
    "{{- message['content'] | selectattr('type', 'equalto', 'text') | map(attribute='text') | join(' ') -}}"
    "{%- endif -%}"
    "{{- ' ' if message['role'] == 'user' else '</s>' -}}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- 'ASSISTANT:' -}}{%- endif -%}"
)


def corpus(n_scenes: int = 4000, seed: int = 1234) -> Iterator[str]:
    """Every question/answer wording the generators produce, plus the system prompt."""
    rng = random.Random(seed)
    for _ in range(100):
        yield SYSTEM_PROMPT + " USER: <image>\n"
    yield "zero one two three four five six 0 1 2 3 4 5 6 7 8 9 yes no Yes No"
    for _ in range(200):
        yield f"USER: {text_only_qa(rng).question} ASSISTANT: {TEXT_ONLY_ANSWER}</s>"
    for _ in range(n_scenes):
        scene = sample_scene(rng)
        for generate in GENERATORS.values():
            qa = generate(scene, rng)
            yield f"USER: <image>\n{qa.question} ASSISTANT: {qa.answer}</s>USER: {qa.question} "


def build_tokenizer(vocab_size: int = VOCAB_SIZE) -> PreTrainedTokenizerFast:
    tok = Tokenizer(models.BPE(unk_token=UNK))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        min_frequency=2,
        show_progress=False,
    )
    tok.train_from_iterator(corpus(), trainer=trainer)
    bos_id = tok.token_to_id(BOS)
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B", special_tokens=[(BOS, bos_id)]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=BOS,
        eos_token=EOS,
        unk_token=UNK,
        pad_token=PAD,
        extra_special_tokens={"image_token": IMAGE},
        model_max_length=512,
        padding_side="left",
        chat_template=CHAT_TEMPLATE,
    )
