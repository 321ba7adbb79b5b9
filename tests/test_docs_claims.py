"""What the docs tell a reader to type works on this tree: every store route they name answers on a store seeded
the way `make run` seeds it, every port they curl is published by the compose profile they start, every model they
name ships in pretrained/ or is one the trainer builds, and every `make` target they name exists.

The docs read here: README.md, CONTRIBUTING.md, SECURITY.md and every page of docs/."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

from model_store import ModelStore

ROOT = Path(__file__).resolve().parent.parent
PRETRAINED = ModelStore(ROOT / "pretrained")
DOCS = sorted([ROOT / "README.md", ROOT / "CONTRIBUTING.md", ROOT / "SECURITY.md", *(ROOT / "docs").glob("*.md")])
SERVICE_URL = re.compile(r"https?://127\.0\.0\.1:(\d+)(/[^\s'\"`)>;]*)?")


def doc_texts() -> dict[str, str]:
    return {str(path.relative_to(ROOT)): path.read_text() for path in DOCS if path.exists()}


def code_blocks(text: str) -> list[str]:
    return re.findall(r"```[a-z]*\n(.*?)```", text, flags=re.DOTALL)


def makefile_variable(name: str) -> str:
    match = re.search(rf"^{name}\s*\??=\s*(.*)$", (ROOT / "Makefile").read_text(), flags=re.MULTILINE)
    assert match, f"{name} is not set in the Makefile"
    return match.group(1).strip()


def seed_like_make_models(store: ModelStore) -> None:
    """What `make models` does to an empty store: copy the Makefile's PRETRAINED_MODELS from pretrained/."""
    for name in makefile_variable("PRETRAINED_MODELS").split():
        store.copy_from(PRETRAINED, name, "latest")


# ---- store routes --------------------------------------------------------------------------------


def documented_store_paths() -> set[str]:
    """Every GET path under /models that the docs curl or list; templates keep their {placeholders}."""
    paths = set()
    for text in doc_texts().values():
        for line in text.replace("\\\n", " ").splitlines():  # a command continued over lines is one line
            if "-X PUT" in line or "PUT /" in line:
                continue
            for match in SERVICE_URL.finditer(line):
                path = (match.group(2) or "/").split("?")[0]
                if path.startswith("/models"):
                    paths.add(path)
            for listed in re.findall(r"`(?:GET )?(/models[^`\s]*)`", line):
                paths.add(listed)
            for listed in re.findall(r"GET (/models/[^\s`,]+)", line):
                paths.add(listed)
    return {path.rstrip(":.,;") for path in paths}


def concrete(path: str, names: list[str]) -> list[str]:
    """A documented path with its placeholders filled for each shipped model; `.../{v}/x.png` with the picture kept."""
    if "{name}" not in path:
        return [path]
    return [path.replace("{name}", name).replace("{v}", "latest").replace("{version}", "latest") for name in names]


@pytest.fixture(scope="module")
def seeded_client(tmp_path_factory):
    from fastapi.testclient import TestClient

    from service import Settings, create_app

    store = ModelStore(tmp_path_factory.mktemp("seeded") / "store")
    seed_like_make_models(store)
    with TestClient(create_app(Settings(store=str(store.root), poll_interval_s=60, grpc_port=0)), raise_server_exceptions=False) as client:
        yield client, store


def test_the_docs_name_the_store_routes():
    paths = documented_store_paths()
    assert {"/models", "/models/{name}", "/models/{name}/versions/{v}"} <= paths
    assert any(p.endswith("learning_curve.png") for p in paths), "the photo models' learning curve is not documented"


def test_every_store_route_the_docs_name_answers_on_a_store_seeded_like_make_run(seeded_client):
    client, store = seeded_client
    names = store.models()
    assert names == ["photo", "upgrader"]
    for documented in sorted(documented_store_paths()):
        candidates = concrete(documented, names)
        answers = {path: client.get(path).status_code for path in candidates}
        if documented.endswith(".png") and "{name}" in documented:
            # a picture route: the trainer draws it for some kinds of model, so some shipped model has it
            assert 200 in answers.values(), f"{documented}: no shipped model answers it: {answers}"
        else:
            assert set(answers.values()) == {200}, f"{documented}: {answers}"


def test_every_picture_a_shipped_version_holds_is_served(seeded_client):
    client, store = seeded_client
    for name in store.models():
        version = store.versions(name)[-1]
        pictures = [f for f in store.manifest(name, version)["files"] if f.endswith(".png")]
        assert pictures, name
        for picture in pictures:
            answer = client.get(f"/models/{name}/versions/{version}/{picture}")
            assert answer.status_code == 200 and answer.content.startswith(b"\x89PNG"), (name, picture, answer.status_code)


# ---- ports ---------------------------------------------------------------------------------------


def published_ports() -> dict[str, set[int]]:
    """Each compose profile: the host ports its services publish (the defaults of the `${VAR:-PORT}` forms)."""
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    by_profile: dict[str, set[int]] = {}
    for service in compose["services"].values():
        for port in service.get("ports", []):
            spec = str(port)
            match = re.search(r"(?:\$\{[A-Z0-9_]+:-(\d+)\}|(\d+)):\d+(?:/tcp)?$", spec)
            assert match, f"cannot read the host port of {spec!r}"
            for profile in service.get("profiles", []):
                by_profile.setdefault(profile, set()).add(int(match.group(1) or match.group(2)))
    return by_profile


def curled_ports(texts: dict[str, str] | None = None) -> list[tuple[str, tuple[str, ...], int]]:
    """(document, the compose profiles started before it in its code block, or () for `make run`, port) per curl."""
    found = []
    for document, text in (doc_texts() if texts is None else texts).items():
        for block in code_blocks(text):
            profiles: tuple[str, ...] = ()
            for line in block.replace("\\\n", " ").splitlines():  # a command continued over lines is one line
                if re.match(r"\s*(UPGRADER_\S+=\S+\s+)*docker compose\b.*\bup\b", line):
                    profiles = tuple(re.findall(r"--profile (\w+)", line)) or ("<none>",)
                command = line.split("#")[0]
                if "curl " not in command:
                    continue
                for match in SERVICE_URL.finditer(command):
                    found.append((document, profiles, int(match.group(1))))
    return found


def test_every_port_the_docs_curl_is_published_by_the_profile_they_start():
    ports = published_ports()
    assert ports["cpu"] >= {8000, 8001} and ports["s3"] >= {8030, 8010, 8020}
    serve_port = int(re.search(r"\b(\d+)\)", makefile_variable("PORT")).group(1))  # `make run`'s default
    curls = curled_ports()
    assert any(profiles for _, profiles, _ in curls), "no curl after a docker compose up was found"
    wrong = []
    for document, profiles, port in curls:
        if not profiles:
            if port != serve_port:
                wrong.append(f"{document}: curls {port}, `make run` serves {serve_port}")
        for profile in profiles:
            if port not in ports.get(profile, set()):
                wrong.append(f"{document}: curls {port} after `--profile {profile}`, which publishes {sorted(ports.get(profile, []))}")
    assert wrong == []


def test_the_port_check_catches_a_curl_to_a_port_the_profile_does_not_publish():
    page = "```bash\ndocker compose --profile s3 up -d   # two replicas\ncurl -s http://127.0.0.1:8000/readyz\n```\n"
    assert curled_ports({"page.md": page}) == [("page.md", ("s3",), 8000)]
    assert 8000 not in published_ports()["s3"]


# ---- model names ---------------------------------------------------------------------------------


MODEL_REFERENCES = [
    re.compile(r"[?&]model=([a-z][a-z0-9_]*)"),
    re.compile(r"`([a-z][a-z0-9_]*):(?:\d+|latest|stable)`"),
    re.compile(r"(?:--init-from|INIT_FROM=|--as) ?([a-z][a-z0-9_]*)"),
    re.compile(r"/models/([a-z][a-z0-9_]*)/"),
    re.compile(r"--models ([a-z0-9_,]+)"),
    re.compile(r"\.infer\(\"([a-z][a-z0-9_]*)\""),
]
NOT_MODELS = {"bicubic"}  # POST /bicubic answers as model "bicubic": the baseline, no model


def documented_model_names(texts: dict[str, str] | None = None) -> dict[str, set[str]]:
    names: dict[str, set[str]] = {}
    for document, text in (doc_texts() if texts is None else texts).items():
        for pattern in MODEL_REFERENCES:
            for match in pattern.finditer(text):
                for name in match.group(1).split(","):
                    if name and name not in NOT_MODELS:
                        names.setdefault(name, set()).add(document)
    return names


def test_every_model_the_docs_name_ships_or_is_built_by_the_trainer():
    from upgrader.architectures import ARCHITECTURES

    known = set(PRETRAINED.models()) | set(ARCHITECTURES)
    names = documented_model_names()
    assert {"upgrader", "photo", "conv"} <= set(names)
    unknown = {name: sorted(where) for name, where in names.items() if name not in known}
    assert unknown == {}, f"models the docs name that neither ship in pretrained/ nor are architectures: {unknown}"


def test_every_shipped_version_the_docs_name_is_in_pretrained():
    shipped = {name: set(PRETRAINED.versions(name)) for name in PRETRAINED.models()}
    wrong = []
    for document, text in doc_texts().items():
        for name, version in re.findall(r"`([a-z][a-z0-9_]*):(\d+)`", text):
            if name in shipped and int(version) not in shipped[name]:
                wrong.append(f"{document}: {name}:{version}")
    assert wrong == []


def test_the_model_name_check_catches_an_unknown_model():
    page = "curl 'http://127.0.0.1:8000/upscale?model=espcn' and `upgrader:2`, `python -m trainer --models fc,srcnn`"
    assert documented_model_names({"page.md": page}) == {"espcn": {"page.md"}, "upgrader": {"page.md"}, "fc": {"page.md"},
                                                           "srcnn": {"page.md"}}


# ---- make targets --------------------------------------------------------------------------------


def test_every_make_target_the_docs_name_exists():
    targets = set(re.findall(r"^([a-z][a-z-]*):", (ROOT / "Makefile").read_text(), flags=re.MULTILINE))
    wrong = []
    for document, text in doc_texts().items():
        for target in re.findall(r"`make (?:[A-Z_]+=\S+ )*([a-z][a-z-]*)", text):
            if target not in targets:
                wrong.append(f"{document}: make {target}")
    assert {"run", "train", "test", "models"} <= targets
    assert wrong == []


# ---- numbers taken from manifests ----------------------------------------------------------------


def test_the_photo_runs_table_in_training_says_what_the_manifests_say():
    """docs/training.md's row per shipped photo version: training time, steps, the held-out PSNR-Y at each time it
    quotes (the history entry nearest that minute) and at the end, all from the version's manifest."""
    text = (ROOT / "docs" / "training.md").read_text()
    rows = re.findall(r"^\| \d+ \(`photo:(\d+)`\) \|[^|]*\| (\d+) min \| ([\d,]+) \| ([^|]*) \|$", text, flags=re.MULTILINE)
    assert sorted(int(v) for v, *_ in rows) == PRETRAINED.versions("photo")
    for version, minutes, steps, curve in rows:
        manifest = PRETRAINED.manifest("photo", int(version))
        assert int(minutes) == round(manifest["wall_time_s"] / 60), version
        assert int(steps.replace(",", "")) == manifest["steps"], version
        end = re.search(r"([\d.]+) at the end", curve)
        assert end and float(end.group(1)) == round(manifest["metrics"]["heldout_photos_x4"]["model"]["psnr_y"], 3), version
        for psnr, at in re.findall(r"([\d.]+) at (\d+)(?: min)?", curve):
            nearest = min(manifest["history"], key=lambda h: abs(h["train_seconds"] / 60 - int(at)))
            assert float(psnr) == round(nearest["val_psnr_y"], 3), (version, psnr, at)


# ---- setting names -------------------------------------------------------------------------------


def test_every_upgrader_variable_the_docs_name_is_read_somewhere():
    """An `UPGRADER_*` name in the docs is a service setting or is read by the compose file, the Makefile, a script
    or the code: a renamed or removed setting cannot linger in the docs."""
    from service.settings import Settings

    import subprocess

    settings = {f"UPGRADER_{name.upper()}" for name in Settings.model_fields}
    listed = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, check=True).stdout.decode().split("\0")
    elsewhere = ""
    for name in listed:
        path = ROOT / name
        if name and not name.endswith(".md") and path.is_file() and path.suffix not in {".png", ".safetensors", ".binpb"}:
            elsewhere += path.read_text(errors="replace")
    wrong = []
    for document, text in doc_texts().items():
        for variable in sorted(set(re.findall(r"\bUPGRADER_[A-Z0-9_]*[A-Z0-9]\b", text))):
            if variable not in settings and variable not in elsewhere:
                wrong.append(f"{document}: {variable}")
    assert wrong == []


# ---- paths ---------------------------------------------------------------------------------------


CREATED_BY_THE_READER = {"deploy/kubernetes/base/s3-credentials.env"}  # `cp ...example ...`, git-ignored


def missing_paths(texts: dict[str, str]) -> list[str]:
    top = "|".join(sorted(p.name for p in ROOT.iterdir() if p.is_dir() and not p.name.startswith(".")))
    pattern = re.compile(rf"`((?:{top})/[A-Za-z0-9_./-]*[A-Za-z0-9_/])`")
    missing = []
    for document, text in texts.items():
        for path in sorted(set(pattern.findall(text))):
            if "*" not in path and path not in CREATED_BY_THE_READER and not (ROOT / path).exists():
                missing.append(f"{document}: {path}")
    return missing


def test_every_repository_path_the_docs_name_exists():
    assert missing_paths(doc_texts()) == []


def test_the_path_check_catches_a_moved_file():
    page = "`service/oip/tensors.py` (here) and `service/runtime/tensors.py` (gone)"
    assert missing_paths({"page.md": page}) == ["page.md: service/runtime/tensors.py"]


def test_the_security_checklist_names_settings_the_service_reads():
    """SECURITY.md's hardening table: every variable not marked *compose* is a field of service/settings.py, and the
    *compose* ones are read by docker-compose.yml."""
    from service.settings import Settings

    settings = {f"UPGRADER_{name.upper()}" for name in Settings.model_fields}
    compose = (ROOT / "docker-compose.yml").read_text()
    rows = [line for line in (ROOT / "SECURITY.md").read_text().splitlines() if line.startswith("| `UPGRADER_")]
    assert len(rows) >= 10
    for row in rows:
        first = row.split("|")[1]
        for variable in re.findall(r"UPGRADER_[A-Z0-9_]+", first):
            if "*compose*" in first:
                assert f"${{{variable}" in compose, f"{variable} is not read by docker-compose.yml"
            else:
                assert variable in settings, f"{variable} is not a setting of service/settings.py"


def test_the_readme_headline_table_is_the_one_bench_headline_printed():
    """bench/headline.py writes its numbers (bench/headline.json) and its table (bench/headline.md); the README carries
    that table as printed, so no headline number is typed by hand or left behind by a re-measurement."""
    import importlib.util
    import json

    spec = importlib.util.spec_from_file_location("headline", ROOT / "bench" / "headline.py")
    headline = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(headline)
    results = json.loads((ROOT / "bench" / "headline.json").read_text())
    table = headline.table(results, results["machine"])
    assert table in (ROOT / "bench" / "headline.md").read_text()
    assert table in (ROOT / "README.md").read_text(), "README.md's headline table differs from bench/headline.md"
    assert len(table.splitlines()) >= 7 and results["machine"] in table
