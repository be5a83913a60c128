"""Build a tiny random-weight Llama + a locally trained BPE tokenizer, with no download.

Run it with the vLLM venv's python (it needs torch, transformers and tokenizers):

    .vllm-venv/bin/python tests/vllm_cpu/build_tiny_model.py OUT_DIR [--vocab 1024] [--seed 0]

The result is a normal Hugging Face model directory (config.json, model.safetensors,
tokenizer.json, tokenizer_config.json, chat template, generation_config.json) that
`vllm.entrypoints.openai.api_server --model OUT_DIR` serves, chat included.

Shape choices, and why:
  * hidden 128, 4 heads -> head_dim 32: vLLM's CPU attention backend supports head sizes
    32, 64, 80, ... (not 16), so hidden 64 / 4 heads would be rejected at start-up.
  * 2 layers, 4 KV heads, bf16 weights: 2*2*4*32*2 = 1 KiB of KV cache per token.
  * max_position_embeddings 4096 -> vLLM's max_model_len defaults to 4096.
The weights are random (seeded), so the text is gibberish, but the token counts, usage,
streaming, scheduling, KV-cache accounting and preemption are the real vLLM code paths.
"""

from __future__ import annotations

import argparse
import json
import sys
import sysconfig
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

BOS, EOS, UNK, PAD = "<s>", "</s>", "<unk>", "<pad>"

# ChatML-like template: only special tokens that the tokenizer knows, and a generation
# prompt, so that /v1/chat/completions works and `add_generation_prompt` is honoured.
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{{ '<|' + message['role'] + '|>\\n' }}"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for part in message['content'] %}"
    "{% if part['type'] == 'text' %}{{ part['text'] }}{% endif %}"
    "{% endfor %}{% endif %}"
    "{{ eos_token + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\\n' }}{% endif %}"
)
ROLE_TOKENS = ["<|system|>", "<|user|>", "<|assistant|>", "<|tool|>"]


def training_text(max_bytes: int = 2_000_000) -> Iterator[str]:
    """Local text: this interpreter's own standard-library sources (always present),
    plus a few generated English-ish sentences so that chat prompts tokenize sensibly."""
    words = ("the a an of to in is it that for on with as was he she they we you "
             "model token request server engine queue batch cache memory prompt reply "
             "hello world please tell me about what why how when where who which").split()
    yield " ".join(words) * 20
    for i in range(2000):
        yield f"Request {i}: please tell me about {words[i % len(words)]} and " \
              f"{words[(i * 7) % len(words)]}. Hello world, how are you?"
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    total = 0
    for path in sorted(stdlib.glob("*.py")):
        try:
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError):
            continue
        total += len(text)
        yield text
        if total >= max_bytes:
            break


def build_tokenizer(vocab_size: int) -> Any:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token=UNK))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[UNK, BOS, EOS, PAD, *ROLE_TOKENS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(training_text(), trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=BOS, eos_token=EOS, unk_token=UNK, pad_token=PAD,
        additional_special_tokens=ROLE_TOKENS,
        model_max_length=4096,
        clean_up_tokenization_spaces=False,
    )
    fast.chat_template = CHAT_TEMPLATE
    return fast


def build(out: Path, vocab_size: int = 1024, seed: int = 0, dtype: str = "bfloat16") -> Path:
    import torch
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

    out.mkdir(parents=True, exist_ok=True)
    tokenizer = build_tokenizer(vocab_size)
    vocab = len(tokenizer)  # may be a little under vocab_size for a small corpus
    config = LlamaConfig(
        vocab_size=vocab,
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        head_dim=32,
        max_position_embeddings=4096,
        rms_norm_eps=1e-5,
        rope_theta=10000.0,
        tie_word_embeddings=False,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        torch_dtype=dtype,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config).to(getattr(torch, dtype))
    model.eval()
    model.generation_config = GenerationConfig(
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    # Older/newer transformers differ on where the template lands (tokenizer_config.json
    # vs chat_template.jinja); vLLM reads both, but write the .jinja file explicitly too.
    (out / "chat_template.jinja").write_text(CHAT_TEMPLATE, encoding="utf-8")
    (out / "driftsched_tiny.json").write_text(json.dumps({
        "vocab_size": vocab, "hidden_size": 128, "layers": 2, "heads": 4, "kv_heads": 4,
        "head_dim": 32, "dtype": dtype, "seed": seed,
        "kv_bytes_per_token": 2 * 2 * 4 * 32 * torch.tensor([], dtype=getattr(torch, dtype)).element_size(),
        "params": sum(p.numel() for p in model.parameters()),
    }, indent=2), encoding="utf-8")
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("out", type=Path)
    p.add_argument("--vocab", type=int, default=1024)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    args = p.parse_args(argv)
    t0 = time.monotonic()
    out = build(args.out, args.vocab, args.seed, args.dtype)
    print(f"built tiny model in {out} in {time.monotonic() - t0:.1f}s", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
