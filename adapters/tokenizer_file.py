"""Build a :class:`~adapters.tokens.TokenCounter` from a configured ``tokenizer`` value.

One question: *which encoder and chat format count this model's prompts?* The value is

- a path to a Hugging Face ``tokenizer.json``, or to a directory that holds one (a model
  directory as vLLM serves it). Needs the ``tokenizers`` package (``pip install
  'driftsched[tokenizers]'``). The chat template is read beside it (``chat_template.jinja``,
  else ``tokenizer_config.json``'s ``chat_template``), rendered with ``jinja2`` for a few probe
  conversations, and its overhead measured in tokens (:func:`measure_chat_format`); without a
  template or ``jinja2`` the default format applies. BOS/EOS come from
  ``tokenizer_config.json``. A completion prompt gets the special tokens the tokenizer's
  post-processor adds (vLLM encodes it with ``add_special_tokens``);
- ``tiktoken:cl100k_base``: OpenAI's BPE through the ``tiktoken`` package, offline only. The
  BPE file is not in the wheel and tiktoken downloads it at first use; this module never does:
  it reads tiktoken's cache (``TIKTOKEN_CACHE_DIR``, ``DATA_GYM_CACHE_DIR``, else
  ``<tmp>/data-gym-cache``) and the copy LiteLLM ships, and raises :class:`TokenizerUnavailable`
  when the file is in none of them.

Loading reads files and parses them (a Llama-3 ``tokenizer.json`` is 9 MB, ~0.3 s): run it in
a thread. Every failure is a :class:`TokenizerUnavailable` that says what is missing.
"""

from __future__ import annotations

import base64
import hashlib
import importlib.util
import json
import os
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from adapters.tokens import ChatFormat, Encoder, TokenCounter

TIKTOKEN_PREFIX = "tiktoken:"
_CL100K_URL = "https://openaipublic.blob.core.windows.net/encodings/cl100k_base.tiktoken"
_CL100K_PAT = (r"""'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}++|\p{N}{1,3}+|"""
               r""" ?[^\s\p{L}\p{N}]++[\r\n]*+|\s++$|\s*[\r\n]|\s+(?!\S)|\s""")
_CL100K_SPECIAL = {"<|endoftext|>": 100257, "<|fim_prefix|>": 100258, "<|fim_middle|>": 100259,
                   "<|fim_suffix|>": 100260, "<|endofprompt|>": 100276}
#: the probe text: one common word, one token in every vocabulary worth the name
_PROBE = "hello"


class TokenizerUnavailable(Exception):
    """The configured tokenizer cannot be loaded (missing file or package, bad file)."""


def load_counter(spec: str, **options: Any) -> TokenCounter:
    """The counter for a ``tokenizer`` value (see the module docstring); ``options`` go to
    :class:`TokenCounter` (``inline_chars``, cache sizes)."""
    if spec.startswith(TIKTOKEN_PREFIX):
        return _tiktoken_counter(spec[len(TIKTOKEN_PREFIX):], **options)
    return _hf_counter(Path(spec).expanduser(), **options)


# -- Hugging Face tokenizer.json ---------------------------------------------------------------
def _hf_counter(path: Path, **options: Any) -> TokenCounter:
    if path.is_dir():
        path = path / "tokenizer.json"
    if not path.is_file():
        raise TokenizerUnavailable(f"{path}: no such tokenizer file")
    try:
        from tokenizers import Tokenizer
    except ImportError:
        raise TokenizerUnavailable(
            f"{path}: the 'tokenizers' package is not installed "
            "(pip install 'driftsched[tokenizers]')") from None
    try:
        tok = Tokenizer.from_file(str(path))
    except Exception as e:  # the Rust side raises plain Exception for a malformed file
        raise TokenizerUnavailable(f"{path}: not a tokenizer.json: {e}") from None
    batch = getattr(tok, "encode_batch_fast", tok.encode_batch)

    def encode(texts: Sequence[str]) -> list[int]:
        # the batch call releases the GIL (tok.encode does not): a worker thread runs it
        # while the event loop goes on
        return [len(e) for e in batch(list(texts), add_special_tokens=False)]

    special = len(tok.encode(_PROBE, add_special_tokens=True)) - len(
        tok.encode(_PROBE, add_special_tokens=False))
    config = _read_json(path.with_name("tokenizer_config.json"))
    template = _chat_template(path.parent, config)
    chat = None
    if template is not None:
        chat = measure_chat_format(template, encode, _special_tokens(config))
    return TokenCounter(f"tokenizer:{path}", encode, chat=chat, prompt_special=special, **options)


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _chat_template(directory: Path, config: dict[str, Any]) -> str | None:
    jinja = directory / "chat_template.jinja"
    if jinja.is_file():
        return jinja.read_text(encoding="utf-8")
    t = config.get("chat_template")
    if isinstance(t, list):  # named templates: the default one
        t = next((x.get("template") for x in t if isinstance(x, dict)
                  and x.get("name") == "default"), None)
    return t if isinstance(t, str) else None


def _special_tokens(config: dict[str, Any]) -> dict[str, str]:
    out = {}
    for name in ("bos_token", "eos_token", "unk_token", "pad_token"):
        v = config.get(name)
        if isinstance(v, dict):
            v = v.get("content")
        out[name] = v if isinstance(v, str) else ""
    return out


def measure_chat_format(template: str, encode: Encoder,
                        special: dict[str, str] | None = None) -> ChatFormat | None:
    """The template's overhead in tokens, from probe conversations rendered as vLLM renders
    them (``add_generation_prompt``): ``base`` and ``per_message`` from one user message and
    from user/assistant/user; the system role's own overhead when the template takes a
    system message. ``None`` when ``jinja2`` is missing or the template fails to render."""
    try:
        from jinja2.exceptions import TemplateError
        from jinja2.sandbox import ImmutableSandboxedEnvironment
    except ImportError:
        return None

    def raise_exception(message: str) -> None:
        raise TemplateError(message)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=["jinja2.ext.loopcontrols"])
    env.globals.update(raise_exception=raise_exception, strftime_now=lambda fmt: "")
    env.filters["tojson"] = lambda v, **kw: json.dumps(v, ensure_ascii=False, **kw)
    try:
        compiled = env.from_string(template)
    except TemplateError:
        return None
    x = encode([_PROBE])[0]

    def tokens(*roles: str) -> int | None:
        messages = [{"role": r, "content": _PROBE} for r in roles]
        try:
            text = compiled.render(messages=messages, add_generation_prompt=True, tools=None,
                                   **(special or {}))
        except Exception:  # a template may refuse a role order (raise_exception) or fail
            return None
        return encode([text])[0] - x * len(roles)

    one, three = tokens("user"), tokens("user", "assistant", "user")
    if one is None or three is None:
        return None
    per_message = round((three - one) / 2)
    base = one - per_message
    roles = {}
    system = tokens("system", "user")
    if system is not None:
        roles["system"] = system - one
    return ChatFormat(base=base, per_message=per_message, roles=roles)


# -- tiktoken ----------------------------------------------------------------------------------
def _tiktoken_counter(name: str, **options: Any) -> TokenCounter:
    if name != "cl100k_base":
        raise TokenizerUnavailable(f"tiktoken:{name}: only tiktoken:cl100k_base is supported")
    try:
        import tiktoken
    except ImportError:
        raise TokenizerUnavailable("tiktoken:cl100k_base: the 'tiktoken' package is not "
                                   "installed (pip install tiktoken)") from None
    path = cached_bpe_file(_CL100K_URL)
    if path is None:
        raise TokenizerUnavailable(
            "tiktoken:cl100k_base: its BPE file is not in tiktoken's cache and this machine is "
            "not asked to download it; fetch it once with `TIKTOKEN_CACHE_DIR=DIR python -c "
            "\"import tiktoken; tiktoken.get_encoding('cl100k_base')\"` and set "
            "TIKTOKEN_CACHE_DIR=DIR for the gateway")
    ranks = {}
    for line in path.read_bytes().splitlines():
        if line:
            token, rank = line.split()
            ranks[base64.b64decode(token)] = int(rank)
    enc = tiktoken.Encoding("cl100k_base", pat_str=_CL100K_PAT, mergeable_ranks=ranks,
                            special_tokens=_CL100K_SPECIAL)

    def encode(texts: Sequence[str]) -> list[int]:
        return [len(enc.encode_ordinary(t)) for t in texts]  # releases the GIL

    return TokenCounter("tiktoken:cl100k_base", encode, **options)


def cached_bpe_file(url: str) -> Path | None:
    """tiktoken's cached copy of ``url`` where one is on this machine (no download)."""
    key = hashlib.sha1(url.encode()).hexdigest()
    dirs = [os.environ.get("TIKTOKEN_CACHE_DIR"), os.environ.get("DATA_GYM_CACHE_DIR"),
            os.path.join(tempfile.gettempdir(), "data-gym-cache")]
    spec = importlib.util.find_spec("litellm")  # finds the package without importing it
    if spec is not None and spec.submodule_search_locations:
        dirs.append(os.path.join(next(iter(spec.submodule_search_locations)),
                                 "litellm_core_utils", "tokenizers"))
    for d in dirs:
        if d and (p := Path(d) / key).is_file():
            return p
    return None
