"""The simulator's configuration, resolved from the command line into plain values."""

from __future__ import annotations

from dataclasses import dataclass

from adapters.sim.engine import Policy
from adapters.sim.profiles import DEFAULT_PROFILE, Profile, available_profiles

DEFAULT_MAX_MODEL_LEN = 8192


@dataclass(frozen=True, slots=True)
class SimSettings:
    """Everything :func:`adapters.sim.server.create_app` needs. ``None`` means profile default."""

    model: str
    served_model_names: tuple[str, ...] = ()
    profile: str = DEFAULT_PROFILE
    #: JSON file with more profiles (see :func:`adapters.sim.profiles.available_profiles`)
    profile_file: str | None = None
    workload: str | None = None
    time_scale: float = 1.0
    kv_capacity_tokens: int | None = None
    max_num_seqs: int | None = None
    max_num_batched_tokens: int | None = None
    max_model_len: int | None = None
    scheduling_policy: Policy = "fcfs"
    tokens_per_event: int = 1
    seed: int = 0
    #: ``--tokenizer``: count prompt tokens with it (adapters/tokenizer_file.py), not the heuristic
    tokenizer: str | None = None

    def __post_init__(self) -> None:
        profiles = available_profiles(self.profile_file)
        if self.profile not in profiles:
            raise ValueError(f"unknown profile {self.profile!r}; choose from {sorted(profiles)}")
        if self.time_scale <= 0:
            raise ValueError("--time-scale must be > 0")
        if self.tokens_per_event < 1:
            raise ValueError("--tokens-per-event must be >= 1")
        for name in (
            "kv_capacity_tokens",
            "max_num_seqs",
            "max_num_batched_tokens",
            "max_model_len",
        ):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be >= 1")
        cap = self.kv_tokens
        if self.max_model_len is not None and self.max_model_len > cap:
            raise ValueError(
                f"--max-model-len {self.max_model_len} is larger than the KV cache "
                f"({cap} tokens); vLLM refuses to start in this case. Lower --max-model-len "
                "or raise --kv-capacity-tokens."
            )
        if cap < 16:
            raise ValueError("--kv-capacity-tokens must be at least one 16-token block")

    @property
    def profile_obj(self) -> Profile:
        return available_profiles(self.profile_file)[self.profile]

    @property
    def names(self) -> tuple[str, ...]:
        """Names the server answers to (the first is the one reported)."""
        return self.served_model_names or (self.model,)

    @property
    def kv_tokens(self) -> int:
        """KV capacity in tokens, rounded down to whole 16-token blocks."""
        cap = self.kv_capacity_tokens or self.profile_obj.default_kv_capacity_tokens
        return cap // 16 * 16

    @property
    def model_len(self) -> int:
        """``--max-model-len``, else min(8192, KV capacity) so one request always fits."""
        if self.max_model_len is not None:
            return self.max_model_len
        return min(DEFAULT_MAX_MODEL_LEN, self.kv_tokens)
