"""Admission by predicted footprint, shared by every built-in policy.

Question answered: *admit this request now, let it wait, or shed it?* A request holds
``prompt + p90 predicted output`` KV tokens (capped by ``max_tokens``) from admission to
completion; it is admitted only while its tenant is under its current (drift-adjusted)
concurrency limit and the engine with most room still has a sequence slot and that many free
tokens. Checked in this order:

1. waited ``>= tenant.queue_timeout_s``           -> ``Shed("timeout")``
2. prompt alone exceeds the largest KV budget     -> ``Shed("too_large")``
3. tenant at its limit                            -> ``Wait("tenant_limit")``
4. no free sequence slot / not enough free tokens -> ``Wait("seqs" | "tokens")``, unless the
   tenant may overflow and an overflow backend is free -> ``Admit(overflow=True)``
5. otherwise                                      -> ``Admit(footprint)``

A footprint larger than the largest budget but with a prompt that fits is clamped to the
budget: the p90 is an estimate, and such a request is admitted once an engine is empty
rather than starving. Unknown capacity (``None``) never blocks. Immutable: safe to share.
"""

from __future__ import annotations

from policies.base import AdmissionDecision, Admit, CapacityView, QueuedRequest, Shed, Wait


class FootprintAdmission:
    """:class:`policies.base.AdmissionPolicy` by predicted footprint (see module doc)."""

    __slots__ = ("retry_after_s",)

    def __init__(self, retry_after_s: float = 1.0) -> None:
        #: the ``retry-after`` suggested to a client whose request timed out in the queue
        self.retry_after_s = retry_after_s

    def decide(self, req: QueuedRequest, view: CapacityView, now: float) -> AdmissionDecision:
        tenant = view.tenant
        if now - req.arrival >= tenant.queue_timeout_s:
            return Shed("timeout", self.retry_after_s)
        footprint = req.footprint
        if view.budget_tokens is not None:
            if req.prompt_tokens > view.budget_tokens:
                return Shed("too_large", float("inf"))
            footprint = min(footprint, view.budget_tokens)
        if tenant.limit is not None and tenant.in_flight >= tenant.limit:
            return Wait("tenant_limit")
        blocked: Wait | None = None
        if view.free_seqs is not None and view.free_seqs < 1:
            blocked = Wait("seqs")
        elif view.free_tokens is not None and footprint > view.free_tokens:
            blocked = Wait("tokens")
        if blocked is None:
            return Admit(footprint)
        if tenant.overflow and view.overflow_free:
            return Admit(footprint, overflow=True)
        return blocked
