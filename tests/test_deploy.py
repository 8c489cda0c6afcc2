"""Deployment files: Dockerfile, compose, nginx, Prometheus/Grafana, Kubernetes (deploy/, docs/deploy.md).

Fast checks (always on): the compose file against the Compose specification (compose-spec's strict
parser), the Kubernetes manifests against the Kubernetes OpenAPI schemas (kubernetes-validate, strict:
unknown fields fail), the flags they pass through the real `jaxllm serve` parser, the fields that make
a deployment work (probes, ports, GPUs, graceful stop, multi-host wiring), nginx's streaming settings,
and the Grafana dashboard's queries against a live `/metrics` of the app.

Slow (JAXLLM_TEST_IMAGE=1, root, podman, debootstrap): build the image on a local Debian base and
serve the embedded model from the image's filesystem; see test_image_serves_embedded_model.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import time

import pytest
import yaml

from serving.cli import UsageError, parse_serve_args

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEPLOY = os.path.join(REPO, "deploy")
K8S = os.path.join(DEPLOY, "k8s")

# Kubernetes versions the manifests must validate against: the oldest with the StatefulSet pod-index
# label the multi-host example needs, and the newest the schemas cover.
K8S_VERSIONS = ("1.28", "1.37")


def _load(path):
    with open(os.path.join(DEPLOY, path)) as f:
        return yaml.safe_load(f)


def _k8s_docs():
    docs = []
    for name in sorted(os.listdir(K8S)):
        if name.endswith(".yaml") and name != "kustomization.yaml":
            with open(os.path.join(K8S, name)) as f:
                docs += [(name, d) for d in yaml.safe_load_all(f) if d]
    return docs


def _find(kind, name):
    [doc] = [d for _, d in _k8s_docs() if d["kind"] == kind and d["metadata"]["name"] == name]
    return doc


def _flag_value(argv, flag):
    return argv[argv.index(flag) + 1] if flag in argv else None


def check_serve_argv(argv, substitutions=None):
    """Parse `jaxllm serve` arguments with the real parser; returns (EngineArgs, ServerArgs)."""
    argv = [substitutions.get(a, a) if substitutions else a for a in argv]
    return parse_serve_args(argv)


# ---------------------------------------------------------------------------------------------------
# Dockerfile

def _dockerfile():
    """Instructions as (KEYWORD, text) with line continuations joined, comments dropped."""
    with open(os.path.join(REPO, "Dockerfile")) as f:
        text = re.sub(r"\\\n", " ", f.read())
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            keyword, _, rest = line.partition(" ")
            out.append((keyword.upper(), rest.strip()))
    return out


def test_dockerfile_shape():
    ins = _dockerfile()
    froms = [rest for kw, rest in ins if kw == "FROM"]
    assert len(froms) >= 2 and all(f.startswith("${BASE_IMAGE}") for f in froms), froms
    first_from = next(i for i, (kw, _) in enumerate(ins) if kw == "FROM")
    args = {rest.split("=")[0]: rest.partition("=")[2] for kw, rest in ins if kw == "ARG"}
    assert "slim" in args["BASE_IMAGE"] and ("ARG", f"BASE_IMAGE={args['BASE_IMAGE']}") in ins[:first_from]
    assert args["JAXLLM_EXTRAS"] == "cuda"

    with open(os.path.join(REPO, "pyproject.toml")) as f:
        pyproject = f.read()
    assert re.search(r"^cuda = \[.*jax\[cuda", pyproject, re.M), "the cuda extra the image installs"
    # Everything the distribution packages is copied into the build.
    include = re.search(r'include = \[(.*?)\]', pyproject).group(1)
    packages = [p.strip(' "*') for p in include.split(",")]
    copied = " ".join(rest for kw, rest in ins if kw == "COPY")
    for needed in packages + ["pyproject.toml", "README.md"]:
        assert needed in copied, needed
        assert os.path.exists(os.path.join(REPO, needed)), needed

    runtime = ins[[i for i, (kw, _) in enumerate(ins) if kw == "FROM"][-1]:]
    user = [rest for kw, rest in runtime if kw == "USER"]
    assert user and user[-1] not in ("root", "0"), "runs as a non-root user"
    assert ("ENTRYPOINT", '["jaxllm", "serve"]') in runtime
    env = " ".join(rest for kw, rest in runtime if kw == "ENV")
    cache = re.search(r"JAXLLM_COMPILATION_CACHE=(\S+)", env).group(1)
    volumes = json.loads(next(rest for kw, rest in runtime if kw == "VOLUME"))
    assert "/models" in volumes and any(cache.startswith(v.rstrip("/") + "/") or cache == v for v in volumes)
    health_url = re.search(r"JAXLLM_HEALTH_URL=(\S+)", env).group(1)
    assert health_url == "http://127.0.0.1:8000/health"
    healthcheck = next(rest for kw, rest in runtime if kw == "HEALTHCHECK")
    assert "JAXLLM_HEALTH_URL" in healthcheck and "--start-period" in healthcheck
    assert ("EXPOSE", "8000") in runtime
    # The uid the Kubernetes manifests run as is the image's user.
    assert re.search(r"useradd --uid 1000\b", " ".join(rest for kw, rest in runtime if kw == "RUN"))


def test_dockerignore_keeps_the_build_inputs():
    with open(os.path.join(REPO, ".dockerignore")) as f:
        ignored = {line.strip() for line in f if line.strip() and not line.startswith("#")}
    assert {".git", ".venv", ".cache"} <= ignored
    copied = [rest.split()[0] for kw, rest in _dockerfile() if kw == "COPY" and not rest.startswith("--from")]
    assert not ignored & set(copied), "the Dockerfile copies something .dockerignore leaves out"


# ---------------------------------------------------------------------------------------------------
# Compose, Prometheus, nginx

_VAR = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::?-([^}]*))?\}")


def _interpolate(value):
    """Compose's variable interpolation with every variable unset (defaults apply)."""
    if isinstance(value, str):
        return _VAR.sub(lambda m: m.group(2) or "", value)
    if isinstance(value, list):
        return [_interpolate(v) for v in value]
    if isinstance(value, dict):
        return {k: _interpolate(v) for k, v in value.items()}
    return value


@pytest.fixture(scope="module")
def compose():
    return _interpolate(_load("docker-compose.yml"))  # safe_load resolves the `<<: *jaxllm` merges


def test_compose_matches_the_compose_spec(compose):
    from compose_spec import PyCompose

    parsed = PyCompose.from_json(json.dumps(compose))  # strict: unknown keys and bad values raise
    parsed.validate()
    parsed.to_spec()
    bad = json.loads(json.dumps(compose))
    bad["services"]["jaxllm"]["healthcheck"]["intervall"] = "30s"
    with pytest.raises(ValueError):
        PyCompose.from_json(json.dumps(bad))


def test_compose_references_resolve(compose):
    services = compose["services"]
    for name, svc in services.items():
        for dep in svc.get("depends_on", {}):
            assert dep in services, (name, dep)
            condition = svc["depends_on"][dep].get("condition") if isinstance(svc["depends_on"], dict) else None
            if condition == "service_healthy":
                assert "healthcheck" in services[dep], (name, dep)
        for mount in svc.get("volumes", []):
            source = mount.split(":")[0]
            if source.startswith("."):
                if source != "./models":  # the user's model directory (JAXLLM_MODELS_DIR)
                    assert os.path.exists(os.path.join(DEPLOY, source)), (name, source)
            else:
                assert source in compose["volumes"], (name, source)
        if "build" in svc:
            assert os.path.exists(os.path.join(DEPLOY, svc["build"]["context"], svc["build"]["dockerfile"]))


def test_compose_jaxllm_services(compose):
    services = compose["services"]
    servers = [n for n in services if n.startswith("jaxllm")]
    assert servers == ["jaxllm", "jaxllm-0", "jaxllm-1"]
    config_path = os.path.join(DEPLOY, "jaxllm.yaml")
    for name in servers:
        svc = services[name]
        [device] = svc["deploy"]["resources"]["reservations"]["devices"]
        assert device["driver"] == "nvidia" and "gpu" in device["capabilities"]
        assert "/health" in " ".join(svc["healthcheck"]["test"]) and svc["healthcheck"]["start_period"]
        # The command (with the --config file it names, mounted from deploy/jaxllm.yaml) parses.
        assert any(m.startswith("./jaxllm.yaml:/etc/jaxllm/config.yaml") for m in svc["volumes"])
        engine_args, server_args = check_serve_argv(
            [config_path if a == "/etc/jaxllm/config.yaml" else a for a in svc["command"]])
        assert server_args.port == 8000 and server_args.metrics_without_auth
        assert "JAXLLM_API_KEY" in svc["environment"]
    assert services["jaxllm"]["ports"] == ["8000:8000"]
    ids = [services[n]["deploy"]["resources"]["reservations"]["devices"][0]["device_ids"] for n in servers[1:]]
    assert ids == [["0"], ["1"]], "each replica has its own GPU"
    assert {"jaxllm-0", "jaxllm-1"} <= set(services["nginx"]["depends_on"])


def test_prometheus_scrapes_every_server(compose):
    prom = _load("prometheus.yml")
    [job] = [j for j in prom["scrape_configs"] if j["job_name"] == "jaxllm"]
    assert job.get("metrics_path", "/metrics") == "/metrics"
    targets = [t for group in job["static_configs"] for t in group["targets"]]
    servers = [n for n in compose["services"] if n.startswith("jaxllm")]
    assert sorted(targets) == sorted(f"{n}:8000" for n in servers)
    mount = [m for m in compose["services"]["prometheus"]["volumes"] if m.startswith("./prometheus.yml:")]
    assert mount and mount[0].split(":")[1] in compose["services"]["prometheus"]["command"][0]


def _nginx_blocks(text):
    """nginx.conf -> nested [(name, args, children | None)]; raises on unbalanced braces."""
    tokens = re.findall(r'"[^"]*"|[{};]|[^\s{};"]+', re.sub(r"#[^\n]*", "", text))
    stack, current, words = [], [], []
    for tok in tokens:
        if tok == "{":
            block = (words[0], words[1:], [])
            current.append(block)
            stack.append(current)
            current, words = block[2], []
        elif tok == "}":
            assert not words, f"directive without ';' before '}}': {words}"
            current = stack.pop()
        elif tok == ";":
            current.append((words[0], words[1:], None))
            words = []
        else:
            words.append(tok)
    assert not stack and not words, "unbalanced braces or a missing ';'"
    return current


def _seconds(value):
    m = re.fullmatch(r"(\d+)(ms|s|m|h)?", value)
    return int(m.group(1)) * {"ms": 0.001, "s": 1, None: 1, "m": 60, "h": 3600}[m.group(2)]


def test_nginx_streams_and_waits_for_long_generations(compose):
    with open(os.path.join(DEPLOY, "nginx.conf")) as f:
        top = _nginx_blocks(f.read())
    [http] = [b for b in top if b[0] == "http"]
    [upstream] = [b for b in http[2] if b[0] == "upstream"]
    servers = [args[0] for name, args, _ in upstream[2] if name == "server"]
    replicas = [n for n, s in compose["services"].items() if "replicas" in s.get("profiles", []) and n != "nginx"]
    assert sorted(servers) == sorted(f"{n}:8000" for n in replicas) and len(servers) >= 2
    [server] = [b for b in http[2] if b[0] == "server"]
    [root] = [b for b in server[2] if b[0] == "location" and b[1] == ["/"]]
    directives = {name: args for name, args, children in root[2] if children is None}
    assert directives["proxy_pass"] == [f"http://{upstream[1][0]}"]
    assert directives["proxy_buffering"] == ["off"], "SSE chunks must reach the client as they are sent"
    assert directives["proxy_http_version"] == ["1.1"]
    for timeout in ("proxy_read_timeout", "proxy_send_timeout"):
        assert _seconds(directives[timeout][0]) >= 600, timeout
    assert "non_idempotent" not in directives.get("proxy_next_upstream", []), "a POST must never run twice"
    assert compose["services"]["nginx"]["volumes"][0].startswith("./nginx.conf:/etc/nginx/nginx.conf")


# ---------------------------------------------------------------------------------------------------
# Grafana dashboard against the server's own /metrics

@pytest.fixture(scope="module")
def live_metrics():
    """Sample names -> label names, from /metrics of the app (fake engine) after one chat request."""
    from prometheus_client.parser import text_string_to_metric_families

    from tests.server_helpers import make_client

    client, _ = make_client()
    with client:
        r = client.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi"}],
                                                      "max_tokens": 3})
        assert r.status_code == 200, r.text
        text = client.get("/metrics").text
    samples = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            samples.setdefault(s.name, set()).update(s.labels)
    assert samples, "no series in /metrics"
    return samples


def _dashboard_queries():
    with open(os.path.join(DEPLOY, "grafana", "dashboards", "jaxllm.json")) as f:
        dash = json.load(f)
    queries = []
    for panel in dash["panels"]:
        if panel["type"] == "row":
            continue
        assert panel.get("targets"), f"panel {panel['title']!r} has no query"
        queries += [(panel["title"], t["expr"]) for t in panel["targets"]]
    for var in dash["templating"]["list"]:
        if var["type"] == "query":
            q = var["query"]
            queries.append((f"variable {var['name']}", q["query"] if isinstance(q, dict) else q))
    return dash, queries


_SERIES = re.compile(r"[a-zA-Z_][a-zA-Z0-9_]*(?::[a-zA-Z0-9_:]*)+")  # recording-rule style names hold ':'


def test_dashboard_queries_name_only_exported_series(live_metrics):
    dash, queries = _dashboard_queries()
    used = set()
    for title, expr in queries:
        names = _SERIES.findall(expr)
        assert names, f"{title}: no jaxllm series in {expr!r}"
        for name in names:
            assert name in live_metrics, f"{title}: {name} is not exported by /metrics"
            used.add(name)
            # Label matchers and groupings on this series use labels it has (Prometheus adds instance, job).
            for m in re.finditer(re.escape(name) + r"\{([^}]*)\}", expr):
                for label in re.findall(r"(\w+)\s*[=!]~?", m.group(1)):
                    assert label in live_metrics[name] | {"instance", "job"}, (title, name, label)
        for group in re.findall(r"by \(([^)]*)\)", expr):
            labels = {g.strip() for g in group.split(",")}
            assert any(labels <= live_metrics[n] | {"instance", "job"} for n in names), (title, labels)
    # What the issue asks the dashboard to show.
    for needed in ("jaxllm:num_requests_running", "jaxllm:num_requests_waiting", "jaxllm:kv_cache_usage_perc",
                   "jaxllm:time_to_first_token_seconds_bucket", "jaxllm:inter_token_latency_seconds_bucket",
                   "jaxllm:generation_tokens_total", "jaxllm:prompt_tokens_total",
                   "jaxllm:prefix_cache_hits_total", "jaxllm:prefix_cache_queries_total",
                   "jaxllm:bucket_padding_ratio", "jaxllm:compilations_total"):
        assert needed in used, needed
    ids = [p["id"] for p in dash["panels"]]
    assert len(ids) == len(set(ids))


def test_grafana_provisioning_points_at_the_dashboard(compose):
    datasource = yaml.safe_load(open(os.path.join(DEPLOY, "grafana/provisioning/datasources/prometheus.yml")))
    [ds] = datasource["datasources"]
    assert ds["type"] == "prometheus" and ds["url"] == "http://prometheus:9090"
    assert "prometheus" in compose["services"]
    provider = yaml.safe_load(open(os.path.join(DEPLOY, "grafana/provisioning/dashboards/jaxllm.yml")))
    path = provider["providers"][0]["options"]["path"]
    mounts = dict(m.split(":")[:2] for m in compose["services"]["grafana"]["volumes"])
    assert mounts["./grafana/dashboards"] == path and mounts["./grafana/provisioning"] == "/etc/grafana/provisioning"
    dash, _ = _dashboard_queries()
    [var] = [v for v in dash["templating"]["list"] if v["type"] == "datasource"]
    assert var["query"] == ds["type"]


# ---------------------------------------------------------------------------------------------------
# Kubernetes

@pytest.mark.parametrize("version", K8S_VERSIONS)
def test_k8s_manifests_match_the_openapi_schemas(version):
    import kubernetes_validate

    docs = _k8s_docs()
    assert {d["kind"] for _, d in docs} >= {"Deployment", "Service", "HorizontalPodAutoscaler", "StatefulSet",
                                            "PersistentVolumeClaim", "ConfigMap"}
    for name, doc in docs:
        kubernetes_validate.validate(doc, version, strict=True)
    bad = json.loads(json.dumps(_find("Deployment", "jaxllm")))
    bad["spec"]["template"]["spec"]["containers"][0]["readinesProbe"] = bad["spec"]["template"]["spec"][
        "containers"][0].pop("readinessProbe")
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(bad, version, strict=True)


def test_kustomization_lists_existing_files():
    with open(os.path.join(K8S, "kustomization.yaml")) as f:
        kustomization = yaml.safe_load(f)
    for resource in kustomization["resources"]:
        assert os.path.exists(os.path.join(K8S, resource)), resource
    assert "deployment.yaml" in kustomization["resources"] and "service.yaml" in kustomization["resources"]


def _prestop_seconds(container):
    command = container["lifecycle"]["preStop"]["exec"]["command"]
    assert command[0] == "sleep"
    return int(command[1])


def _check_server_pod(pod_spec, argv_substitutions=None):
    """Fields every jaxllm pod needs; returns (container, parsed ServerArgs)."""
    [c] = pod_spec["containers"]
    assert c["image"] and ":" in c["image"] and not c["image"].endswith(":latest")
    _, server_args = check_serve_argv(c["args"], argv_substitutions)
    port = {p["name"]: p["containerPort"] for p in c["ports"]}["http"]
    assert port == server_args.port
    assert int(c["resources"]["limits"]["nvidia.com/gpu"]) >= 1
    # The kubelet must not kill a draining server: grace >= preStop + --shutdown-timeout.
    shutdown = int(_flag_value(c["args"], "--shutdown-timeout"))
    assert pod_spec["terminationGracePeriodSeconds"] >= _prestop_seconds(c) + shutdown + 5
    assert pod_spec["securityContext"]["runAsNonRoot"] and pod_spec["securityContext"]["runAsUser"] == 1000
    mounts = {m["name"] for m in c["volumeMounts"]}
    assert mounts <= {v["name"] for v in pod_spec["volumes"]}
    assert {m["mountPath"]: m["name"] for m in c["volumeMounts"]}.get("/cache") == "cache"
    assert server_args.metrics_without_auth or "authorization" in json.dumps(pod_spec)
    return c, server_args


def test_deployment_probes_ports_gpus_and_graceful_stop():
    dep = _find("Deployment", "jaxllm")
    pod = dep["spec"]["template"]
    c, server_args = _check_server_pod(pod["spec"])
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        get = c[probe]["httpGet"]
        assert get["path"] == "/health" and get["port"] in ("http", server_args.port), probe
    # Start-up (load + compile) gets its own long budget; liveness is quick once it has passed.
    startup = c["startupProbe"]
    assert startup["periodSeconds"] * startup["failureThreshold"] >= 600
    assert dep["spec"]["selector"]["matchLabels"].items() <= pod["metadata"]["labels"].items()
    assert pod["metadata"]["annotations"]["prometheus.io/path"] == "/metrics"

    svc = _find("Service", "jaxllm")
    assert svc["spec"]["selector"].items() <= pod["metadata"]["labels"].items()
    [port] = svc["spec"]["ports"]
    assert port["targetPort"] in ("http", server_args.port)


def test_hpa_scales_on_waiting_requests(live_metrics):
    hpa = _find("HorizontalPodAutoscaler", "jaxllm")
    target = hpa["spec"]["scaleTargetRef"]
    assert (target["kind"], target["name"]) == ("Deployment", "jaxllm") and _find("Deployment", "jaxllm")
    [metric] = hpa["spec"]["metrics"]
    name = metric["pods"]["metric"]["name"]
    # The adapter rule turns the server's gauge into the metric the HPA reads.
    adapter = yaml.safe_load(_find("ConfigMap", "prometheus-adapter-jaxllm")["data"]["config.yaml"])
    [rule] = adapter["rules"]
    series = re.match(r"[\w:]+", rule["seriesQuery"]).group(0)
    assert series == "jaxllm:num_requests_waiting" and series in live_metrics
    renamed = re.sub(rule["name"]["matches"], rule["name"]["as"].replace("${1}", r"\1"), series)
    assert renamed == name
    assert hpa["spec"]["minReplicas"] >= 1 and hpa["spec"]["maxReplicas"] > hpa["spec"]["minReplicas"]


def test_multihost_statefulset_wires_jax_distributed():
    sts = _find("StatefulSet", "jaxllm-multihost")
    spec, pod = sts["spec"], sts["spec"]["template"]
    [c] = pod["spec"]["containers"]
    env = {e["name"]: e for e in c["env"]}
    assert "$(JAX_PROCESS_ID)" in c["args"]
    assert env["JAX_PROCESS_ID"]["valueFrom"]["fieldRef"]["fieldPath"] == \
        "metadata.labels['apps.kubernetes.io/pod-index']"
    c, _ = _check_server_pod(pod["spec"], {"$(JAX_PROCESS_ID)": "1"})
    args = c["args"]
    assert int(_flag_value(args, "--num-processes")) == spec["replicas"] >= 2
    # Process 0's stable DNS name through the headless Service, which publishes not-ready pods
    # (process 0 is not ready until the others joined).
    host, port = _flag_value(args, "--coordinator-address").rsplit(":", 1)
    headless = _find("Service", spec["serviceName"])
    assert host == f"{sts['metadata']['name']}-0.{spec['serviceName']}"
    assert headless["spec"]["clusterIP"] == "None" and headless["spec"]["publishNotReadyAddresses"]
    assert int(port) == {p["name"]: p["containerPort"] for p in c["ports"]}["coordinator"]
    assert int(port) in [p["port"] for p in headless["spec"]["ports"]]
    assert spec["podManagementPolicy"] == "Parallel", "ordered start would wait for process 0 forever"
    # The model spans every GPU of every process.
    gpus = int(c["resources"]["limits"]["nvidia.com/gpu"]) * spec["replicas"]
    tp, pp = int(_flag_value(args, "--tensor-parallel-size")), int(_flag_value(args, "--pipeline-parallel-size"))
    assert tp * pp == gpus
    # Only process 0 serves HTTP: the API Service selects it alone; probes test /health there.
    api = _find("Service", "jaxllm-multihost")
    assert api["spec"]["selector"]["apps.kubernetes.io/pod-index"] == "0"
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        command = " ".join(c[probe]["exec"]["command"])
        assert "JAX_PROCESS_ID" in command and "JAXLLM_HEALTH_URL" in command, probe


def test_check_serve_argv_rejects_what_the_parser_rejects():
    with pytest.raises(UsageError):
        check_serve_argv(["--max-model-len", "lots"])
    with pytest.raises(UsageError):
        check_serve_argv(["--shutdown-timeout", "soon"])
    with pytest.raises(UsageError, match="process_id must be below"):
        check_serve_argv(["--coordinator-address", "h:1", "--num-processes", "2", "--process-id", "2"])


# ---------------------------------------------------------------------------------------------------
# The image, built and run (slow; opt-in)

@pytest.mark.slow
@pytest.mark.timeout(3600)
@pytest.mark.skipif(os.environ.get("JAXLLM_TEST_IMAGE") != "1",
                    reason="builds the image with podman (~4-6 min on 2 cores); set JAXLLM_TEST_IMAGE=1")
def test_image_serves_embedded_model(tmp_path):
    import httpx

    from tests.deploy import image_rootfs as img

    missing = img.missing_tools()
    if missing:
        pytest.fail("JAXLLM_TEST_IMAGE=1 needs " + ", ".join(missing) + " (apt-get install podman debootstrap)")
    # JAXLLM_TEST_IMAGE_TAG: run an image built before (e.g. by an earlier run) instead of building.
    tag = os.environ.get("JAXLLM_TEST_IMAGE_TAG")
    if not tag:
        base = img.ensure_base_image(os.environ.get("JAXLLM_TEST_BASE_IMAGE", img.DEFAULT_BASE_TAG))
        tag = "localhost/jaxllm:test"
        seconds = img.build_image(tag, base, extras="", log_path=str(tmp_path / "build.log"))
        print(f"image build: {seconds:.0f} s")

    port, key = 18000 + os.getpid() % 1000, "image-test-key"
    with img.RootfsProcess(tag) as run:
        config = run.config
        assert config["Entrypoint"] == ["jaxllm", "serve"] and config["User"] == "jaxllm"
        health = config["Healthcheck"]["Test"]
        assert health[0] == "CMD"
        url = f"http://127.0.0.1:{port}"
        # `docker run -e JAXLLM_API_KEY=... IMAGE --port ... --max-model-len ...`: no MODEL, so the
        # embedded SmolLM2 is served; small context and buckets keep the CPU compile short.
        proc = run.start(["--port", str(port), "--host", "127.0.0.1", "--max-model-len", "256", "--max-num-seqs",
                          "4", "--max-num-batched-tokens", "64", "--kv-cache-memory", "32MiB",
                          "--disable-log-stats"], str(tmp_path / "server.log"), {"JAXLLM_API_KEY": key})
        deadline = time.monotonic() + 600
        while True:
            assert proc.poll() is None, (tmp_path / "server.log").read_text()[-3000:]
            try:
                if httpx.get(url + "/health", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, (tmp_path / "server.log").read_text()[-3000:]
            time.sleep(1)
        # The image's own HEALTHCHECK command, run inside the image, against this port.
        checked = run.exec(health[1:], extra_env={"JAXLLM_HEALTH_URL": url + "/health"})
        assert checked.returncode == 0, checked.stderr
        assert httpx.get(url + "/v1/models", timeout=10).status_code == 401, "JAXLLM_API_KEY is enforced"
        r = httpx.post(url + "/v1/chat/completions", headers={"Authorization": f"Bearer {key}"}, timeout=120,
                       json={"messages": [{"role": "user", "content": "What is the capital of France?"}],
                             "max_tokens": 8, "temperature": 0})
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["choices"][0]["message"]["content"].strip()
        assert body["usage"]["completion_tokens"] > 0 and body["model"]
        log = (tmp_path / "server.log").read_text()
        assert "/cache/jax" in log or os.listdir(os.path.join(run.root, "cache", "jax")), \
            "the compilation cache goes to the /cache volume"
        assert run.stop() == 0, "SIGTERM (docker stop) ends the server cleanly"
    print(shlex.join(["image", tag, "served", body["choices"][0]["message"]["content"]]))
