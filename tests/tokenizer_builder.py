"""A real tokenizer directory for tests, trained locally in about a second (no download).

:func:`build_tokenizer_dir` writes what a model directory holds for vLLM: ``tokenizer.json``
(a byte-level BPE, as GPT-2 / Llama-3 use, trained on this interpreter's standard library with
the tiny test model's special tokens), ``tokenizer_config.json`` (BOS/EOS) and
``chat_template.jinja`` (the tiny model's ChatML-like template, tests/vllm_cpu).
:func:`reference_count` is what vLLM computes for a chat request: the template rendered
whole (transformers' Jinja settings) and encoded without special tokens, independently of
the gateway's per-message arithmetic.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from tests.vllm_cpu.build_tiny_model import (
    BOS,
    CHAT_TEMPLATE,
    EOS,
    PAD,
    ROLE_TOKENS,
    UNK,
    training_text,
)


def build_tokenizer_dir(out: Path, vocab_size: int = 2048, max_bytes: int = 400_000) -> Path:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    out.mkdir(parents=True, exist_ok=True)
    tok = Tokenizer(models.BPE(unk_token=UNK))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=[UNK, BOS, EOS, PAD, *ROLE_TOKENS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(training_text(max_bytes), trainer=trainer)
    tok.save(str(out / "tokenizer.json"))
    (out / "tokenizer_config.json").write_text(json.dumps({
        "bos_token": BOS, "eos_token": EOS, "unk_token": UNK, "pad_token": PAD}))
    (out / "chat_template.jinja").write_text(CHAT_TEMPLATE, encoding="utf-8")
    return out


def reference_count(directory: Path, source: Any) -> int:
    """vLLM's prompt_tokens for ``source``: chat messages rendered whole by the template and
    encoded without special tokens; a completion prompt encoded with them."""
    from jinja2.sandbox import ImmutableSandboxedEnvironment
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(directory / "tokenizer.json"))
    if isinstance(source, str):
        return len(tok.encode(source, add_special_tokens=True))
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    text = env.from_string(CHAT_TEMPLATE).render(
        messages=source, add_generation_prompt=True, bos_token=BOS, eos_token=EOS)
    return len(tok.encode(text, add_special_tokens=False))
