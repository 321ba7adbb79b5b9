"""The docs: the MkDocs site builds strictly, the README's links resolve, the generated pages cover the code and
the shipped models, and no tracked file refers to working periods or tracker numbers (history lives in git)."""

from __future__ import annotations

import html
import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
MKDOCS = Path(sys.executable).parent / "mkdocs"
README_MAX_LINES = 150
# a working period or a tracker item with its number, in any spelling (test_the_history_check_catches_each_form)
HISTORY = re.compile(r"(?<![a-z])(sessions?|issues?)[ _-]?#?[0-9]+", re.IGNORECASE)


def load_hook():
    spec = importlib.util.spec_from_file_location("docs_generated", ROOT / "docs" / "hooks" / "generated.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def build(site: Path, config: Path = ROOT / "mkdocs.yml") -> subprocess.CompletedProcess:
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1"}
    return subprocess.run([str(MKDOCS), "build", "--strict", "--config-file", str(config), "--site-dir", str(site)],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=240)


@pytest.fixture(scope="module")
def site(tmp_path_factory) -> Path:
    site = tmp_path_factory.mktemp("site")
    result = build(site)
    assert result.returncode == 0, result.stdout + result.stderr
    return site


def page_text(site: Path, page: str) -> str:
    """A built page's text, without its HTML tags."""
    return html.unescape(re.sub(r"<[^>]+>", "", (site / page / "index.html").read_text()))


# ---- the site ----------------------------------------------------------------------------------


def test_docs_build_strictly_with_every_page_in_the_nav(site):
    pages = sorted(p.stem for p in (ROOT / "docs").glob("*.md"))
    built = sorted(p.parent.name for p in site.glob("*/index.html") if p.parent.name not in {"search"})
    assert built == sorted(p for p in pages if p != "index")
    assert "<!-- generated:" not in "".join(p.read_text() for p in site.glob("*/index.html"))


def test_a_broken_link_fails_the_strict_build(tmp_path):
    """The check above can fail: the same site with one link to a missing page does not build."""
    docs = tmp_path / "docs"
    shutil.copytree(ROOT / "docs", docs)
    (docs / "api.md").write_text((docs / "api.md").read_text() + "\nSee [nowhere](no-such-page.md).\n")
    config = tmp_path / "mkdocs.yml"
    text = (ROOT / "mkdocs.yml").read_text().replace("docs/hooks/generated.py", str(docs / "hooks" / "generated.py"))
    config.write_text(text.replace("docs_dir: docs", f"docs_dir: {docs}"))
    result = build(tmp_path / "site", config)
    assert result.returncode != 0
    assert "no-such-page.md" in result.stdout + result.stderr


def test_every_setting_of_the_settings_class_is_in_the_generated_configuration_page(site):
    from service.settings import Settings

    hook = load_hook()
    rows = {row["name"]: row for row in hook.settings_rows()}
    assert list(rows) == list(Settings.model_fields)
    page = page_text(site, "configuration")
    for name, field in Settings.model_fields.items():
        env = f"UPGRADER_{name.upper()}"
        assert rows[name]["env"] == env
        assert env in page, f"{env} missing from the configuration page"
        assert field.description and field.description.replace("`", "") in page, f"{env}'s description missing"
    assert "`./store`" in hook.settings_table() and "`~/.cache/upgrader/models`" in hook.settings_table()
    assert "| `UPGRADER_PORT` | `--port` | `8000` |" in hook.settings_table()


def test_every_shipped_version_has_a_model_card_with_its_manifests_metrics(site):
    page = page_text(site, "models")
    shipped = sorted(ROOT.glob("pretrained/*/*/manifest.json"))
    assert shipped
    for path in shipped:
        manifest = json.loads(path.read_text())
        assert f"{manifest['name']}:{manifest['version']}" in page
        assert f"{manifest['parameter_count']:,}" in page
        metrics = manifest["metrics"].get("heldout_photos_x4") or manifest["metrics"]  # a photo model's, or an 8x8 model's
        psnr = "psnr_y" if "heldout_photos_x4" in manifest["metrics"] else "psnr"
        assert f"{metrics['model'][psnr]:.3f} dB" in page
        assert f"{metrics['bicubic'][psnr]:.3f} dB" in page


def test_a_model_added_to_the_store_gets_its_card(tmp_path):
    hook = load_hook()
    source = max(ROOT.glob("pretrained/*/*/manifest.json"))
    manifest = {**json.loads(source.read_text()), "name": "photo", "version": 1}
    manifest["metrics"] = {k: v for k, v in manifest["metrics"].items() if k != "natural"}  # CIFAR-10 only
    (tmp_path / "photo" / "1").mkdir(parents=True)
    (tmp_path / "photo" / "1" / "manifest.json").write_text(json.dumps(manifest))
    (tmp_path / "photo" / "2").mkdir()  # claimed, never committed: no card
    cards = hook.model_cards(tmp_path)
    assert cards.count("## `") == 1 and "## `photo:1`" in cards
    assert "natural photo tiles (held out)" not in cards  # no row for a validation set it was not measured on


def test_the_hooks_draw_every_generated_page_without_torch_or_the_app():
    """docs/hooks/generated.py reads manifests, service/settings.py and upgrader/architectures.py's source: with torch,
    FastAPI and the installed package made unimportable it still draws both pages, the same as here."""
    hook = load_hook()
    script = f"""
import importlib.util, json, sys
for name in ("torch", "torchvision", "fastapi", "model_store", "trainer", "openvino"):
    sys.modules[name] = None
spec = importlib.util.spec_from_file_location("docs_generated", {str(ROOT / "docs" / "hooks" / "generated.py")!r})
hook = importlib.util.module_from_spec(spec)
spec.loader.exec_module(hook)
print(json.dumps({{"cards": hook.model_cards(), "settings": hook.settings_table(), "architectures": hook.architectures()}}))
"""
    result = subprocess.run([sys.executable, "-c", script], cwd="/", capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    drawn = json.loads(result.stdout)
    assert drawn["cards"] == hook.model_cards() and drawn["settings"] == hook.settings_table()


def test_the_hooks_reading_of_architectures_matches_the_registry():
    from upgrader.architectures import ARCHITECTURES, fully_convolutional

    hook = load_hook()
    assert hook.architectures() == {name: fully_convolutional(name) for name in ARCHITECTURES}
    with pytest.raises(KeyError, match="unknown architecture"):
        hook.fully_convolutional("no_such_net")


def test_every_model_card_names_its_licence_and_training_data(site):
    page = page_text(site, "models")
    assert page.count("Licence and intended use:") == len(sorted(ROOT.glob("pretrained/*/*/manifest.json")))
    notices = (ROOT / "THIRD_PARTY_NOTICES.md").read_text()
    hook = load_hook()
    for name, version, manifest in hook.shipped_versions():
        data = hook.training_data(manifest)
        assert data, f"{name}:{version} names no training data"
        for label in data:
            assert label in page
            assert label.split(" (")[0].split("'")[0] in notices, f"{label} has no entry in THIRD_PARTY_NOTICES.md"


@pytest.mark.slow
def test_the_docs_build_in_a_fresh_venv_with_only_the_docs_group(tmp_path):
    """`python -m venv` (no system site-packages) + `pip install --group docs`: the site builds --strict, and neither
    torch nor the app is importable there. pip may install from its cache or a local index."""
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=120)
    assert "include-system-site-packages = false" in (venv / "pyvenv.cfg").read_text()
    python = venv / "bin" / "python"
    env = {k: v for k, v in os.environ.items() if k not in {"PYTHONPATH", "VIRTUAL_ENV"}} | {"NO_MKDOCS_2_WARNING": "1"}
    pip = [str(python), "-m", "pip", "install", "-q", "--disable-pip-version-check"]
    for step in (["pip>=25.1"], ["--group", "docs"]):  # --group: pip >= 25.1
        done = subprocess.run(pip + step, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, done.stdout + done.stderr
    for module in ("torch", "fastapi", "service.app"):
        probe = subprocess.run([str(python), "-c", f"import {module}"], cwd=ROOT, env=env, capture_output=True, text=True)
        assert probe.returncode != 0 and "ModuleNotFoundError" in probe.stderr, f"{module} is importable in the docs venv"
    site = tmp_path / "site"
    built = subprocess.run([str(venv / "bin" / "mkdocs"), "build", "--strict", "--site-dir", str(site)], cwd=ROOT, env=env,
                           capture_output=True, text=True, timeout=240)
    assert built.returncode == 0, built.stdout + built.stderr
    hook = load_hook()
    configuration, models = page_text(site, "configuration"), page_text(site, "models")
    assert all(row["env"] in configuration for row in hook.settings_rows())
    assert all(f"{name}:{version}" in models for name, version, _ in hook.shipped_versions())


# ---- the README --------------------------------------------------------------------------------


def slug(heading: str) -> str:
    """The anchor MkDocs (Python-Markdown's toc) and GitHub give a heading."""
    text = re.sub(r"[`*_]", "", heading).strip().lower()
    return re.sub(r"[\s]+", "-", re.sub(r"[^\w\s-]", "", text))


def anchors(markdown: Path) -> set[str]:
    text = re.sub(r"```.*?```", "", markdown.read_text(), flags=re.DOTALL)
    return {slug(m) for m in re.findall(r"^#+\s+(.*)$", text, flags=re.MULTILINE)}


def relative_links(markdown: str) -> list[str]:
    text = re.sub(r"```.*?```", "", markdown, flags=re.DOTALL)
    return [t for t in re.findall(r"\]\(([^)\s]+)\)", text) if not re.match(r"[a-z]+:", t)]


def broken_links(readme: Path) -> list[str]:
    broken = []
    for target in relative_links(readme.read_text()):
        path, _, anchor = target.partition("#")
        where = (readme.parent / path) if path else readme
        if not where.exists():
            broken.append(target)
        elif anchor and where.suffix == ".md" and anchor not in anchors(where):
            broken.append(target)
    return broken


def test_every_relative_link_in_the_readme_resolves():
    readme = ROOT / "README.md"
    assert len(relative_links(readme.read_text())) >= 10
    assert broken_links(readme) == []


def test_the_link_check_catches_a_missing_file_and_a_missing_anchor(tmp_path):
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "a.md").write_text("# A page\n\n## Images of any size\n")
    readme = tmp_path / "README.md"
    readme.write_text("[ok](docs/a.md#images-of-any-size) [gone](docs/b.md) [no anchor](docs/a.md#nope) [web](https://x.org)\n")
    assert broken_links(readme) == ["docs/b.md", "docs/a.md#nope"]


def test_readme_stays_short_and_keeps_the_two_commands():
    text = (ROOT / "README.md").read_text()
    assert len(text.splitlines()) <= README_MAX_LINES
    assert "make run" in text and "make test" in text


# ---- history belongs in git --------------------------------------------------------------------


def history_references(paths: list[Path]) -> list[str]:
    found = []
    for path in paths:
        try:
            data = path.read_bytes()
        except (FileNotFoundError, IsADirectoryError):
            continue  # deleted in the working tree, or a submodule
        if b"\0" in data[:8192]:
            continue  # binary
        for number, line in enumerate(data.decode("utf-8", "replace").splitlines(), start=1):
            match = HISTORY.search(line)
            if match:
                where = path.relative_to(ROOT) if path.is_relative_to(ROOT) else path
                found.append(f"{where}:{number}: {match.group(0)}")
    return found


def test_no_tracked_file_refers_to_working_periods_or_tracker_numbers():
    listed = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, check=True).stdout
    paths = [ROOT / name for name in listed.decode().split("\0") if name]
    assert len(paths) > 100
    found = history_references(paths)
    assert found == [], "say what is true now, with its evidence; history is in git log:\n" + "\n".join(found[:40])


def test_the_history_check_catches_each_form(tmp_path):
    forms = ["session " + "15's Xeon", "Session " + "20", "sessions " + "15-16", "issue " + "12", "issue #" + "5",
             "issue-" + "12", "def test_issue" + "5_flags", "ISSUE " + "3"]
    path = tmp_path / "notes.md"
    path.write_text("\n".join(forms + ["the session's cookie", "tissue 3", "an issue with 2 causes"]))
    assert len(history_references([path])) == len(forms)
