"""Read an engine's context length (``max_model_len``) from its ``GET /v1/models``.

vLLM reports it per served model (``{"data": [{"id": ..., "max_model_len": 8192}]}``), and
so does the simulator. Admission uses it to refuse at once a prompt that no engine serving
the model could ever take (``Scheduler.check_fits``), instead of queueing it until the
engine's own 400. Endpoints that do not report it (other OpenAI-compatible servers) leave
it unknown, which never refuses anything.
"""

from __future__ import annotations

import httpx

from adapters.base import Backend


async def probe_model_len(
    client: httpx.AsyncClient, b: Backend, headers: dict[str, str] | None = None
) -> None:
    """Fill ``b.max_model_len`` from ``/v1/models`` (the smallest over ``b``'s models),
    once: ``b.model_len_probed`` is set when the engine answered, whatever it said. A
    network error leaves both unset, to try again on the next scrape."""
    if b.max_model_len is not None or b.model_len_probed:
        return
    try:
        resp = await client.get(b.url.rstrip("/") + "/v1/models", headers=headers, timeout=5.0)
    except httpx.HTTPError:
        return
    b.model_len_probed = True
    if resp.status_code != 200:
        return
    try:
        data = resp.json().get("data")
        lens = [int(m["max_model_len"]) for m in data
                if isinstance(m, dict) and m.get("id") in b.models
                and isinstance(m.get("max_model_len"), int) and m["max_model_len"] > 0]
    except (ValueError, AttributeError, TypeError):
        return
    if lens:
        b.max_model_len = min(lens)
