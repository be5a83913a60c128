"""The workload file: one request per JSONL line, validated the same way by every reader.

**Header** (first line, optional in hand-written files): ``{"_workload": {...}}`` with
``format`` (``"driftsched-workload"``), ``version`` (1), ``name``, ``source``, ``seed``,
``duration_s``, ``max_context``, ``n_requests``, ``tenants`` ([{name, qos_class, weight, n,
rate_req_s}]), ``drift`` (the spec's events: at_s, tenant, output_scale[, lengths]),
``clipped`` / ``dropped`` (requests whose lengths were capped to fit ``max_context`` / left
out), ``params`` (how it was built) and ``assumes`` (free-form, e.g. the pool a scenario's
rates were sized for).

**Request lines**, sorted by ``arrival_s``:

- ``id`` (str, ``[A-Za-z0-9._:-]{1,64}``, unique) -- the load generator sends it as
  ``x-request-id``;
- ``arrival_s`` (number >= 0) -- intended send time, seconds from the start of the replay;
- ``tenant`` (str, the gateway's tenant-name rule) and ``qos_class`` (str);
- exactly one of ``messages`` (chat: a list of ``{"role", "content"}``) or ``prompt``
  (completions: a string);
- ``max_tokens`` (int >= 1, or null: the client sends no cap);
- ``output_tokens`` (int >= 1) -- the TRUE output length, which the simulator generates;
- ``prompt_tokens`` (int) -- :func:`adapters.sim.workload.count_prompt_tokens` of the
  prompt: ``ceil(chars / 4)`` plus 4 per message and 3 for the assistant header, the count
  the simulator and the gateway use;
- optional ``source`` (provenance, e.g. ``"azure-conv:1234"``, ``"sharegpt:<id>"``) and
  generation parameters sent as given: ``temperature``, ``top_p``, ``top_k``, ``seed``,
  ``min_tokens``, ``stop``, ``presence_penalty``, ``frequency_penalty``, ``ignore_eos``,
  ``extra_body`` (an object merged into the request body).

Any other key is an error that names it. The simulator (``python -m adapters.sim --workload
FILE``) reads the same file: it skips the header (no ``output_tokens``) and the fields it does
not know, and maps each prompt's :func:`~adapters.sim.workload.prompt_key` to
``output_tokens``; so two lines with the same prompt but different ``output_tokens`` are an
error here.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

from adapters.sim.workload import count_prompt_tokens, prompt_key

FORMAT = "driftsched-workload"
VERSION = 1
HEADER_KEY = "_workload"
DEFAULT_MAX_CONTEXT = 8192  # the simulator's default max_model_len
ID_RE = re.compile(r"^[A-Za-z0-9._:-]{1,64}$")  # what the gateway accepts as x-request-id
TENANT_RE = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")  # the gateway's tenant-name rule
REQUIRED = ("id", "arrival_s", "tenant", "qos_class", "output_tokens", "prompt_tokens")
#: optional generation parameters -> accepted JSON types (bool is never a number here)
GEN_PARAMS: dict[str, tuple[type, ...]] = {
    "temperature": (int, float),
    "top_p": (int, float),
    "top_k": (int,),
    "seed": (int,),
    "min_tokens": (int,),
    "stop": (str, list),
    "presence_penalty": (int, float),
    "frequency_penalty": (int, float),
    "ignore_eos": (bool,),
    "extra_body": (dict,),
}
KNOWN = {*REQUIRED, "messages", "prompt", "max_tokens", "source", *GEN_PARAMS}


@dataclass(frozen=True, slots=True)
class Request:
    """One line of a workload file (see the module docstring for each field)."""

    id: str
    arrival_s: float
    tenant: str
    qos_class: str
    messages: list[dict[str, Any]] | None
    prompt: str | None
    max_tokens: int | None
    output_tokens: int
    prompt_tokens: int
    source: str | None = None
    params: dict[str, Any] = field(default_factory=dict)

    @property
    def chat(self) -> bool:
        return self.messages is not None

    @property
    def path(self) -> str:
        """The OpenAI route this request goes to."""
        return "/v1/chat/completions" if self.chat else "/v1/completions"

    def to_json(self) -> dict[str, Any]:
        row: dict[str, Any] = {
            "id": self.id,
            "arrival_s": self.arrival_s,
            "tenant": self.tenant,
            "qos_class": self.qos_class,
        }
        row["messages" if self.chat else "prompt"] = self.messages if self.chat else self.prompt
        row.update(
            max_tokens=self.max_tokens,
            output_tokens=self.output_tokens,
            prompt_tokens=self.prompt_tokens,
        )
        if self.source is not None:
            row["source"] = self.source
        row.update(self.params)
        return row

    def body(self, model: str, *, stream: bool = True) -> dict[str, Any]:
        """The OpenAI request body (streaming asks for usage in the last chunk)."""
        b: dict[str, Any] = {"model": model}
        if self.chat:
            b["messages"] = self.messages
        else:
            b["prompt"] = self.prompt
        if self.max_tokens is not None:
            b["max_tokens"] = self.max_tokens
        b["stream"] = stream
        if stream:
            b["stream_options"] = {"include_usage": True}
        params = dict(self.params)
        b.update(params.pop("extra_body", None) or {})
        b.update(params)
        return b


@dataclass(frozen=True, slots=True)
class Problem:
    """Something wrong with a workload file. ``line`` is 1-based (0: the file as a whole)."""

    line: int
    field: str
    reason: str
    severity: str = "error"  # "error" | "warning"

    def render(self, path: str | Path) -> str:
        where = f"{path}:{self.line}" if self.line else str(path)
        return f"{where}: {self.severity}: {self.field}: {self.reason}"


@dataclass(slots=True)
class Workload:
    """A parsed file: its header (``{}`` if none), requests, and any warnings."""

    header: dict[str, Any]
    requests: list[Request]
    problems: list[Problem] = field(default_factory=list)

    @property
    def errors(self) -> list[Problem]:
        return [p for p in self.problems if p.severity == "error"]

    @property
    def tenants(self) -> list[str]:
        return sorted({r.tenant for r in self.requests})


class WorkloadError(ValueError):
    """A workload file that does not validate; ``problems`` lists every error found."""

    def __init__(self, path: str | Path, problems: list[Problem]) -> None:
        self.path, self.problems = str(path), problems
        shown = "\n".join(p.render(path) for p in problems[:20])
        more = f"\n... and {len(problems) - 20} more" if len(problems) > 20 else ""
        super().__init__(f"{path}: {len(problems)} error(s) in the workload file\n{shown}{more}")


def is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def is_num(v: Any) -> bool:
    return (is_int(v) or isinstance(v, float)) and math.isfinite(v)


def _check_messages(v: Any, out: list[str]) -> None:
    if not isinstance(v, list) or not v:
        out.append("must be a non-empty list of {role, content} objects")
        return
    for i, m in enumerate(v):
        if not isinstance(m, dict):
            out.append(f"[{i}] must be an object")
        elif not isinstance(m.get("role"), str):
            out.append(f"[{i}].role must be a string")
        elif not isinstance(m.get("content"), str | list):
            out.append(f"[{i}].content must be a string or a list of parts")


def parse_row(row: Any, lineno: int) -> tuple[Request | None, list[Problem]]:
    """Validate one decoded request line; the request is ``None`` when there are errors."""
    probs: list[Problem] = []

    def err(fld: str, reason: str, severity: str = "error") -> None:
        probs.append(Problem(lineno, fld, reason, severity))

    if not isinstance(row, dict):
        err("-", f"a request must be a JSON object, got {type(row).__name__}")
        return None, probs
    for k in sorted(set(row) - KNOWN):
        err(k, f"unknown field; allowed: {', '.join(sorted(KNOWN))}")
    for k in REQUIRED:
        if k not in row:
            err(k, "missing")
    if ("messages" in row) == ("prompt" in row):
        err("messages|prompt", "exactly one of messages (chat) or prompt (completions) is required")
    rid: Any = row.get("id")
    if "id" in row and not (isinstance(rid, str) and ID_RE.match(rid)):
        err("id", f"{rid!r} must match {ID_RE.pattern}")
    arr: Any = row.get("arrival_s")
    if "arrival_s" in row and not (is_num(arr) and arr >= 0):
        err("arrival_s", f"{arr!r} must be a finite number >= 0")
    ten: Any = row.get("tenant")
    if "tenant" in row and not (isinstance(ten, str) and TENANT_RE.match(ten)):
        err("tenant", f"{ten!r} must match {TENANT_RE.pattern}")
    cls: Any = row.get("qos_class")
    if "qos_class" in row and not (isinstance(cls, str) and cls):
        err("qos_class", f"{cls!r} must be a non-empty string")
    if "messages" in row:
        out: list[str] = []
        _check_messages(row["messages"], out)
        for reason in out:
            err("messages", reason)
    if "prompt" in row and not isinstance(row["prompt"], str):
        err("prompt", "must be a string")
    mt: Any = row.get("max_tokens")
    if mt is not None and not (is_int(mt) and mt >= 1):
        err("max_tokens", f"{mt!r} must be an int >= 1 or null")
    ot: Any = row.get("output_tokens")
    if "output_tokens" in row and not (is_int(ot) and ot >= 1):
        err("output_tokens", f"{ot!r} must be an int >= 1 (the true output length)")
    if "source" in row and not isinstance(row["source"], str):
        err("source", "must be a string")
    for k, types in GEN_PARAMS.items():
        if k in row and (
            (isinstance(row[k], bool) and bool not in types) or not isinstance(row[k], types)
        ):
            err(k, f"{row[k]!r} must be {' or '.join(t.__name__ for t in types)}")
    if probs:
        return None, probs
    source = row.get("messages", row.get("prompt"))
    expected = count_prompt_tokens(source)
    if row["prompt_tokens"] != expected:
        err(
            "prompt_tokens",
            f"{row['prompt_tokens']!r} but the prompt counts {expected} tokens "
            "(adapters.sim.workload.count_prompt_tokens)",
        )
        return None, probs
    if mt is not None and ot > mt:
        err("output_tokens", f"{ot} > max_tokens {mt}: the engine stops at max_tokens", "warning")
    if row.get("ignore_eos") and mt != ot:
        err(
            "ignore_eos",
            f"with ignore_eos the engine generates max_tokens ({mt}), not output_tokens ({ot})",
            "warning",
        )
    req = Request(
        id=rid,
        arrival_s=float(arr),
        tenant=ten,
        qos_class=cls,
        messages=row.get("messages"),
        prompt=row.get("prompt"),
        max_tokens=mt,
        output_tokens=ot,
        prompt_tokens=row["prompt_tokens"],
        source=row.get("source"),
        params={k: row[k] for k in GEN_PARAMS if k in row},
    )
    return req, probs


def _check_header(h: Any, lineno: int) -> list[Problem]:
    probs: list[Problem] = []
    if not isinstance(h, dict):
        return [Problem(lineno, HEADER_KEY, "must be an object")]
    if h.get("format") != FORMAT:
        probs.append(Problem(lineno, f"{HEADER_KEY}.format", f"must be {FORMAT!r}"))
    if h.get("version") != VERSION:
        probs.append(
            Problem(
                lineno,
                f"{HEADER_KEY}.version",
                f"{h.get('version')!r}: this reader knows version {VERSION}",
            )
        )
    mc = h.get("max_context")
    if mc is not None and not (is_int(mc) and mc > 1):
        probs.append(Problem(lineno, f"{HEADER_KEY}.max_context", "must be an int > 1"))
    tenants = h.get("tenants", [])
    if not isinstance(tenants, list) or not all(
        isinstance(t, dict) and isinstance(t.get("name"), str) for t in tenants
    ):
        probs.append(Problem(lineno, f"{HEADER_KEY}.tenants", "must be a list of {name, ...}"))
    return probs


def check_lines(lines: Iterable[str], max_context: int | None = None) -> Workload:
    """Parse and validate workload lines; every problem is collected, nothing raised."""
    header: dict[str, Any] = {}
    reqs: list[Request] = []
    probs: list[Problem] = []
    seen_ids: dict[str, int] = {}
    seen_keys: dict[str, tuple[int, int]] = {}
    classes: dict[str, Any] = {}
    last_arrival, first = -1.0, True
    for lineno, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            probs.append(Problem(lineno, "-", f"not JSON: {e}"))
            first = False
            continue
        if isinstance(row, dict) and HEADER_KEY in row:
            if not first:
                probs.append(Problem(lineno, HEADER_KEY, "the header must be the first line"))
            elif set(row) != {HEADER_KEY}:
                probs.append(Problem(lineno, HEADER_KEY, "the header line holds only _workload"))
            else:
                probs.extend(_check_header(row[HEADER_KEY], lineno))
                header = row[HEADER_KEY] if isinstance(row[HEADER_KEY], dict) else {}
                declared = header.get("tenants")
                if isinstance(declared, list):
                    classes = {
                        t["name"]: t.get("qos_class")
                        for t in declared
                        if isinstance(t, dict) and isinstance(t.get("name"), str)
                    }
            first = False
            continue
        first = False
        req, p = parse_row(row, lineno)
        probs.extend(p)
        if req is None:
            continue
        limit = max_context or header.get("max_context") or None
        if req.arrival_s < last_arrival:
            probs.append(
                Problem(
                    lineno,
                    "arrival_s",
                    f"{req.arrival_s} is before the previous "
                    f"request's {last_arrival}; lines must be sorted by arrival_s",
                )
            )
        last_arrival = max(last_arrival, req.arrival_s)
        if req.id in seen_ids:
            probs.append(
                Problem(lineno, "id", f"{req.id!r} already used on line {seen_ids[req.id]}")
            )
        seen_ids.setdefault(req.id, lineno)
        key = prompt_key(req.messages if req.chat else req.prompt)
        if key in seen_keys and seen_keys[key][1] != req.output_tokens:
            probs.append(
                Problem(
                    lineno,
                    "output_tokens",
                    f"same prompt as line {seen_keys[key][0]} "
                    f"with a different output_tokens ({seen_keys[key][1]}): the "
                    "simulator keys lengths by prompt and keeps only the last",
                )
            )
        seen_keys[key] = (lineno, req.output_tokens)
        if classes and req.tenant not in classes:
            probs.append(
                Problem(lineno, "tenant", f"{req.tenant!r} is not in the header's tenants")
            )
        elif classes and classes[req.tenant] not in (None, req.qos_class):
            probs.append(
                Problem(
                    lineno,
                    "qos_class",
                    f"{req.qos_class!r} but the header gives "
                    f"{req.tenant!r} class {classes[req.tenant]!r}",
                )
            )
        need = req.prompt_tokens + (req.max_tokens or req.output_tokens)
        if limit and need > limit:
            what = "max_tokens" if req.max_tokens else "output_tokens"
            probs.append(
                Problem(
                    lineno,
                    what,
                    f"prompt_tokens + {what} = {need} > max_context "
                    f"{limit}: the engine would refuse it (400)",
                )
            )
        reqs.append(req)
    if not reqs and not any(p.severity == "error" for p in probs):
        probs.append(Problem(0, "-", "no requests"))
    return Workload(header, reqs, probs)


def check_file(path: str | Path, max_context: int | None = None) -> Workload:
    """Validate a workload file (see :func:`check_lines`)."""
    with open(path, encoding="utf-8") as f:
        return check_lines(f, max_context)


def load_workload(path: str | Path, max_context: int | None = None) -> Workload:
    """Read a workload file; raises :class:`WorkloadError` listing every error."""
    w = check_file(path, max_context)
    if w.errors:
        raise WorkloadError(path, w.errors)
    return w


def write_workload(out: TextIO, header: dict[str, Any], requests: Sequence[Request]) -> None:
    out.write(json.dumps({HEADER_KEY: header}, ensure_ascii=False, separators=(",", ":")) + "\n")
    for r in requests:
        out.write(json.dumps(r.to_json(), ensure_ascii=False, separators=(",", ":")) + "\n")
