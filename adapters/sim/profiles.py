"""Step-time profiles: how long one engine step takes on a given model/GPU pair.

A step that processes ``N`` tokens (prefill-chunk tokens plus one per decoding request)
takes, in milliseconds::

    T(N) = max(a + b*N, c*N)                         # linear operators (Vidur fit)
         + sum(decode context tokens) * kv_bytes_per_token / bandwidth * 1000
         + cpu_ms_per_step                            # scheduler + sampling + detokenize

The first term is Vidur's operator profile fitted as a roofline: a fixed launch/weight-load
cost ``a`` plus ``b`` per token while memory-bound, ``c`` per token once compute-bound. The
second is decode attention, which reads every cached token of every decoding request once per
step (prefill-chunk attention is folded into the linear fit). The third is vLLM's CPU
overhead per step, a constant 3 ms (measured vLLM v1 overhead is 2-4 ms).

The default KV capacity is what vLLM would allocate on an 80 GB card at
``--gpu-memory-utilization 0.9``: ``(0.9 * 80 GiB - weight bytes) / kv_bytes_per_token``,
rounded down to whole 16-token blocks (activation memory is not subtracted).

More profiles (e.g. one calibrated by ``bench/sim_fidelity.py`` for the machine at hand) come
from a JSON file (``--profile-file``): one object with :class:`Profile`'s fields, or a list
of them; ``cpu_ms_per_step`` and ``request_overhead_ms`` may be left out, any other missing
or unknown key is an error.
"""

from __future__ import annotations

import functools
import json
from dataclasses import MISSING, dataclass, fields
from pathlib import Path
from typing import Any

BLOCK_SIZE = 16
CPU_MS_PER_STEP = 3.0
GPU_MEMORY_UTILIZATION = 0.9
GIB = 1 << 30


@dataclass(frozen=True, slots=True)
class Profile:
    """One model/GPU pair. Times in milliseconds, bandwidth in bytes per second."""

    name: str
    a_ms: float
    b_ms: float
    c_ms: float
    kv_bytes_per_token: int
    max_num_batched_tokens: int
    max_num_seqs: int
    bandwidth_bytes_per_s: float
    gpu_memory_bytes: int
    weight_bytes: int
    cpu_ms_per_step: float = CPU_MS_PER_STEP
    #: latency a request spends outside the engine before it queues (vLLM's API server:
    #: HTTP, input processing, IPC); it adds to TTFT and latency but occupies no step.
    #: 0 for the GPU profiles (negligible next to their steps); fitted for CPU profiles
    request_overhead_ms: float = 0.0

    @property
    def default_kv_capacity_tokens(self) -> int:
        free = self.gpu_memory_bytes * GPU_MEMORY_UTILIZATION - self.weight_bytes
        blocks = int(free // self.kv_bytes_per_token) // BLOCK_SIZE
        return blocks * BLOCK_SIZE

    def step_time_s(self, num_tokens: int, decode_context_tokens: int) -> float:
        """Duration of a step with ``num_tokens`` scheduled tokens; 0.0 for an empty step.

        ``decode_context_tokens`` is the sum, over requests decoding in this step, of the
        tokens whose KV the step reads (their context length including the new token).
        """
        if num_tokens <= 0:
            return 0.0
        linear_ms = max(self.a_ms + self.b_ms * num_tokens, self.c_ms * num_tokens)
        attention_s = decode_context_tokens * self.kv_bytes_per_token / self.bandwidth_bytes_per_s
        return (linear_ms + self.cpu_ms_per_step) / 1000.0 + attention_s


_A100_BW = 1.5e12  # A100-80GB SXM: 2.04 TB/s peak * ~0.75 achieved
_H100_BW = 2.5e12  # H100-80GB SXM: 3.35 TB/s peak * ~0.75 achieved
_LLAMA3_8B_WEIGHTS = 16_060_000_000  # 8.03 B params * 2 bytes (bf16)
_LLAMA2_7B_WEIGHTS = 13_480_000_000  # 6.74 B params * 2 bytes (fp16)

PROFILES: dict[str, Profile] = {
    p.name: p
    for p in (
        Profile(
            "llama3-8b-a100",
            9.8,
            0.029,
            0.0667,
            131072,
            2048,
            256,
            _A100_BW,
            80 * GIB,
            _LLAMA3_8B_WEIGHTS,
        ),
        Profile(
            "llama2-7b-a100",
            9.0,
            0.026,
            0.0625,
            524288,
            2048,
            256,
            _A100_BW,
            80 * GIB,
            _LLAMA2_7B_WEIGHTS,
        ),
        Profile(
            "llama2-7b-h100",
            5.5,
            0.008,
            0.0211,
            524288,
            8192,
            1024,
            _H100_BW,
            80 * GIB,
            _LLAMA2_7B_WEIGHTS,
        ),
    )
}
DEFAULT_PROFILE = "llama3-8b-a100"


def profile_from_dict(data: dict[str, Any]) -> Profile:
    """A :class:`Profile` from plain JSON data; raises ValueError naming a bad key."""
    known = {f.name: f for f in fields(Profile)}
    unknown = sorted(set(data) - set(known))
    if unknown:
        raise ValueError(f"profile: unknown key(s) {unknown}")
    missing = sorted(n for n, f in known.items() if f.default is MISSING and n not in data)
    if missing:
        raise ValueError(f"profile {data.get('name')!r}: missing key(s) {missing}")
    p = Profile(**data)
    times = (p.a_ms, p.b_ms, p.c_ms, p.cpu_ms_per_step, p.request_overhead_ms)
    if min(times) < 0 or p.bandwidth_bytes_per_s <= 0:
        raise ValueError(f"profile {p.name!r}: times must be >= 0 and bandwidth > 0")
    return p


@functools.lru_cache(maxsize=8)
def available_profiles(profile_file: str | None = None) -> dict[str, Profile]:
    """The built-in profiles plus those in ``profile_file`` (which win on a name clash)."""
    out = dict(PROFILES)
    if profile_file is None:
        return out
    try:
        data = json.loads(Path(profile_file).read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"--profile-file {profile_file}: {e}") from e
    for item in data if isinstance(data, list) else [data]:
        if not isinstance(item, dict):
            raise ValueError(f"--profile-file {profile_file}: expected objects, got {item!r}")
        p = profile_from_dict(item)
        out[p.name] = p
    return out
