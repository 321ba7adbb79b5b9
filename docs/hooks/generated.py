"""MkDocs hook: the pages that are generated from the code and the shipped models, so they cannot drift.

- `<!-- generated: settings -->` in a page becomes the table of every field of `service.settings.Settings`:
  its environment variable, CLI flag (when `python -m service` has one), default and description.
- `<!-- generated: model-cards -->` becomes one card per committed version of every model in `pretrained/`
  (a model store: `<name>/<version>/manifest.json`), read from its manifest.

Both functions are plain Python (tests/test_docs.py calls them too); mkdocs.yml names this file under `hooks:`.
Neither imports torch or the app: the settings class is imported from `service/settings.py` alone (pydantic), the
cards read manifests, and what an architecture is comes from `upgrader/architectures.py`'s source. So the site
builds with the docs dependency group only (`pip install --group docs`, pyproject.toml).
"""

from __future__ import annotations

import ast
import json
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PRETRAINED = ROOT / "pretrained"
ARCHITECTURES_SOURCE = ROOT / "upgrader" / "architectures.py"
MARKERS = {"<!-- generated: settings -->": lambda: settings_table(), "<!-- generated: model-cards -->": lambda: model_cards()}


def on_files(files, config):  # MkDocs event: each shipped photo model's samples.png, for its card
    from mkdocs.structure.files import File

    for name, version, manifest in shipped_versions():
        if "heldout_photos_x4" in manifest.get("metrics", {}) and (PRETRAINED / name / str(version) / "samples.png").is_file():
            files.append(File.generated(config, sample_picture(name, version),
                                        abs_src_path=str(PRETRAINED / name / str(version) / "samples.png")))
    return files


def sample_picture(name: str, version: int) -> str:
    """Where a shipped photo model's samples.png lands in the site (beside models.md)."""
    return f"model-pictures/{name}-{version}-samples.png"


def on_page_markdown(markdown: str, page, config, files) -> str:  # MkDocs event
    for marker, render in MARKERS.items():
        if marker in markdown:
            markdown = markdown.replace(marker, render())
    return markdown


# ---- configuration ----------------------------------------------------------------------------


def _cell(text: str) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def _default(value) -> str:
    """A default as an operator would write it: paths relative to the project or the home directory."""
    if value is None:
        return "unset"
    if isinstance(value, tuple) and not value:
        return "unset"
    if isinstance(value, (str, Path)):
        text = str(value)
        home = str(Path.home())
        if text.startswith(str(ROOT) + "/"):
            return f"`./{text[len(str(ROOT)) + 1:]}`"
        if text.startswith(home + "/"):
            return f"`~/{text[len(home) + 1:]}`"
        return f"`{text}`"
    if isinstance(value, bool):
        return f"`{str(value).lower()}`"
    return f"`{value}`"


def cli_flags() -> set[str]:
    """The long options `python -m service` accepts, read from its parser's source."""
    source = (ROOT / "service" / "__main__.py").read_text()
    return set(re.findall(r'add_argument\(\s*"(--[a-z0-9-]+)"', source))


def settings_rows() -> list[dict[str, str]]:
    """One row per field of the service's settings class: name, env var, flag, default, description."""
    if str(ROOT) not in sys.path:  # `service.settings` of this checkout, installed or not (MkDocs restores sys.path
        sys.path.append(str(ROOT))  # after loading a hook, so this is done here, when the page is drawn)
    from service.settings import Settings

    prefix = Settings.model_config.get("env_prefix", "")
    flags = cli_flags()
    rows = []
    for name, field in Settings.model_fields.items():
        env = field.validation_alias if isinstance(field.validation_alias, str) else f"{prefix}{name}".upper()
        flag = f"--{name.replace('_', '-')}"
        rows.append({"name": name, "env": env, "flag": flag if flag in flags else "",
                     "default": _default(field.get_default(call_default_factory=True)),
                     "description": field.description or ""})
    return rows


def settings_table() -> str:
    lines = ["| environment variable | `python -m service` flag | default | what it does |", "|---|---|---|---|"]
    for row in settings_rows():
        flag = f"`{row['flag']}`" if row["flag"] else ""
        lines.append(f"| `{row['env']}` | {flag} | {row['default']} | {_cell(row['description'])} |")
    return "\n".join(lines)


# ---- model cards ------------------------------------------------------------------------------


def shipped_versions(root: Path = PRETRAINED) -> list[tuple[str, int, dict]]:
    """(name, version, manifest) of every committed version in the store at `root` (a manifest is the commit)."""
    found = []
    for manifest in sorted(root.glob("*/*/manifest.json")):
        version = manifest.parent.name
        if version.isascii() and version.isdigit():
            found.append((manifest.parent.parent.name, int(version), json.loads(manifest.read_text())))
    return sorted(found, key=lambda item: (item[0], item[1]))


def _count(value) -> str:
    return f"{value:,}" if isinstance(value, int) else "?"


def _gain(metrics: dict, key: str = "model") -> str:
    model, bicubic = metrics[key]["psnr"], metrics["bicubic"]["psnr"]
    return f"{model:.3f} dB ({model - bicubic:+.3f})"


def _metrics_table(metrics: dict) -> list[str]:
    sets = [("CIFAR-10 test split", metrics)]
    if "natural" in metrics:
        sets.append(("natural photo tiles (held out)", metrics["natural"]))
    lines = ["| validation set | images | bicubic PSNR / SSIM | model PSNR (vs bicubic) / SSIM | 8-view self-ensemble |",
             "|---|---|---|---|---|"]
    for label, m in sets:
        ensemble = _gain(m, "self_ensemble") if "self_ensemble" in m else "not measured"
        lines.append(f"| {label} | {_count(m.get('images'))} | {m['bicubic']['psnr']:.3f} dB / {m['bicubic']['ssim']:.4f} | "
                     f"{_gain(m)} / {m['model']['ssim']:.4f} | {ensemble} |")
    return lines


def _recipe_line(recipe: dict) -> str:
    keys = ["loss", "optimizer", "lr", "lr_schedule", "schedule_over", "batch_size", "augment", "ema", "amp", "seed"]
    parts = [f"{k} `{recipe[k]}`" for k in keys if k in recipe]
    if recipe.get("quantize_inputs"):
        parts.append("8-bit inputs (`--quantize-inputs`)")
    return ", ".join(parts)


def architectures(source: Path = ARCHITECTURES_SOURCE) -> dict[str, bool]:
    """Every registered architecture (`@register("name")` on a class) and whether it is fully convolutional (its class
    sets `fully_convolutional = True`), read from the module's source so that no torch is imported."""
    found = {}
    for node in ast.parse(source.read_text()).body:
        if not isinstance(node, ast.ClassDef):
            continue
        names = [d.args[0].value for d in node.decorator_list if isinstance(d, ast.Call) and getattr(d.func, "id", None) == "register"
                 and d.args and isinstance(d.args[0], ast.Constant)]
        flag = any(isinstance(s, ast.Assign) and any(getattr(t, "id", None) == "fully_convolutional" for t in s.targets)
                   and isinstance(s.value, ast.Constant) and s.value.value is True for s in node.body)
        for name in names:
            found[name] = flag
    return found


def fully_convolutional(architecture: str) -> bool:
    known = architectures()
    if architecture not in known:
        raise KeyError(f"unknown architecture {architecture!r}; known: {sorted(known)}")
    return known[architecture]


def _limits(architecture: str, manifest: dict) -> str:
    size = "×".join(map(str, manifest["input_shape"][1:]))
    tiles = ("overlapping tiles blended with tent windows, so no seams show" if fully_convolutional(architecture)
             else "plain, abutting tiles (this architecture flattens or pools the tile), so tile seams can show")
    return (f"it upscales {size} RGB images 4×. Larger images go through `POST /upscale?tile=true` as {tiles}; "
            "its metrics are for CIFAR-10 images and natural photo tiles; other kinds of image (text, line art) are not measured.")


# What each training set is, and its terms (THIRD_PARTY_NOTICES.md says more): keyed by how manifests name them.
DATASETS = {
    "cifar": "CIFAR-10 (Krizhevsky, 2009)",
    "bsd200": "BSDS300's 200 training photographs (Martin et al., 2001; research and educational use)",
    "yang91": "T91 (Yang et al., 2010)",
}


def training_data(manifest: dict, root: Path = PRETRAINED, seen: frozenset = frozenset()) -> list[str]:
    """The datasets a version's weights learnt from, its starting point's included (`recipe.init_from`, when that
    version is in `root`), in a fixed order."""
    dataset = manifest.get("dataset", {})
    found = set()
    if str(dataset.get("name", "")).startswith("cifar") or "train_size" in dataset:
        found.add("cifar")
    for photos in (dataset.get("natural"), dataset if "val_images" in dataset else None):
        for file in (photos or {}).get("val_files", []):
            found.add(file.split("/")[0])
    start = manifest.get("recipe", {}).get("init_from")
    if start and (start["name"], start["version"]) not in seen:
        path = root / start["name"] / str(start["version"]) / "manifest.json"
        if path.is_file():
            found.update(key for key, label in DATASETS.items()
                         if label in training_data(json.loads(path.read_text()), root, seen | {(start["name"], start["version"])}))
    return [label for key, label in DATASETS.items() if key in found]


def licence_line(manifest: dict, root: Path = PRETRAINED) -> str:
    kind = ("photographs of any size, 4× (clean, bicubic-reduced inputs)" if "heldout_photos_x4" in manifest.get("metrics", {})
            else "8×8 thumbnails, 4× to 32×32")
    data = "; ".join(training_data(manifest, root)) or "not recorded"
    return (f"- **Licence and intended use:** the weights are distributed under the project's Apache-2.0 licence (`LICENSE`); "
            f"trained on {data}, whose terms are in `THIRD_PARTY_NOTICES.md`. For upscaling {kind} for viewing. The detail "
            "it adds is the model's estimate, not a recovery of the original: not for evidence, identification (faces, "
            "text, number plates) or medical images.")


def photo_model_card(name: str, version: int, manifest: dict) -> str:
    """The card of a whole-photo model (trainer/photo.py): any input size, the standard x4 degradation."""
    arch, recipe, dataset = manifest["architecture"], manifest.get("recipe", {}), manifest.get("dataset", {})
    params = arch.get("params") or {}
    heldout = manifest["metrics"]["heldout_photos_x4"]
    model, bicubic = heldout["model"]["psnr_y"], heldout["bicubic"]["psnr_y"]
    lines = [f"## `{name}:{version}`", ""]
    lines.append(f"- **Architecture:** `{arch['name']}`" + (f" with `{json.dumps(params, sort_keys=True)}`" if params else " (defaults)")
                 + f"; {manifest['parameter_count']:,} parameters; any input size, output {manifest.get('scale', 4)}× as large.")
    realistic = manifest.get("degradation") == "realistic-x4"
    degradation = ("a random chain per crop (`upgrader.degradations`): 30% the clean bicubic reduction, the rest blur, "
                   "a reduction by 4, Gaussian or Poisson noise and JPEG at a quality of 30-95 (docs/training.md)" if realistic else
                   "MATLAB's antialiased bicubic reduction (`upgrader.imaging.bicubic_degrade`, the LR images of every "
                   "published x4 table), rounded to 8 bits")
    lines.append(f"- **Training data:** `{dataset.get('name', '?')}` ({dataset.get('train_images', '?')} photographs, "
                 f"{len(dataset.get('val_files', []))} held out); random {recipe.get('hr_crop', '?')}×{recipe.get('hr_crop', '?')} crops. "
                 f"Degradation: `{manifest.get('degradation')}`, {degradation}.")
    lines.append(f"- **Recipe:** `python -m trainer.photo`: {_recipe_line(recipe)}; {manifest.get('steps', '?')} steps, "
                 f"{manifest.get('wall_time_s', 0) / 60:.1f} minutes on {manifest.get('device_name') or manifest.get('device', '?')}.")
    if "init_from" in recipe:
        start = recipe["init_from"]
        dropped = ", ".join(start.get("dropped_modules", [])) or "nothing"
        lines.append(f"- **Started from:** `{start['name']}:{start['version']}` (sha256 `{start['weights_sha256'][:12]}…`; "
                     f"dropped: {dropped}).")
    lines.append(f"- **Weights:** `weights.safetensors`, sha256 `{manifest['weights_sha256'][:16]}…` "
                 f"({manifest.get('weights', 'last')} weights); evaluation: {manifest.get('evaluation', '?')}.")
    if realistic:
        lines.append("- **Limits:** for JPEG and noisy photos; on clean ones a model trained on clean inputs does better, so "
                     "the service hands clean photos to the model's `clean` alias when a request names no version "
                     "(`service/runtime/inputs.py`, `input_routing` in `GET /models`). The service runs it on whole images "
                     "(large ones in windows that overlap by its receptive field), up to `UPGRADER_MAX_WHOLE_IMAGE_PIXELS` input pixels.")
    else:
        lines.append("- **Limits:** trained for one degradation, clean bicubic reduction by 4; on photos with noise or JPEG "
                     "artefacts it gains little (docs/training.md). The service runs it on whole images (large ones in windows "
                     "that overlap by its receptive field), up to `UPGRADER_MAX_WHOLE_IMAGE_PIXELS` input pixels.")
    lines.append(licence_line(manifest))
    lines += ["", "| validation set | images | bicubic PSNR-Y | model PSNR-Y (vs bicubic) |", "|---|---|---|---|",
              f"| held-out photographs | {_count(heldout.get('images'))} | {bicubic:.3f} dB | {model:.3f} dB ({model - bicubic:+.3f}) |", ""]
    lines.append(f"Serve it: `curl -s -H 'Content-Type: image/png' -H 'Accept: image/png' --data-binary @photo.png "
                 f"'http://127.0.0.1:8000/upscale?tile=true&model={name}&version={version}' -o photo-x4.png`.")
    if (PRETRAINED / name / str(version) / "samples.png").is_file():
        lines += ["", f"![{name}:{version} on held-out crops: LR input, original, model, bicubic]({sample_picture(name, version)})"]
    lines.append("")
    return "\n".join(lines)


def model_card(name: str, version: int, manifest: dict) -> str:
    if "heldout_photos_x4" in manifest.get("metrics", {}):
        return photo_model_card(name, version, manifest)
    arch = manifest["architecture"]
    params = arch.get("params") or {}
    recipe, dataset, metrics = manifest.get("recipe", {}), manifest.get("dataset", {}), manifest["metrics"]
    lines = [f"## `{name}:{version}`", ""]
    lines.append(f"- **Architecture:** `{arch['name']}`" + (f" with `{json.dumps(params, sort_keys=True)}`" if params else " (defaults)")
                 + f"; {manifest['parameter_count']:,} parameters; input {'×'.join(map(str, manifest['input_shape']))}, "
                 f"output {'×'.join(map(str, manifest['output_shape']))} (channels × height × width).")
    data = f"`{dataset.get('name', '?')}` ({_count(dataset.get('train_size'))} training images"
    if "natural" in dataset:
        natural = dataset["natural"]
        data += f"; natural photos `{natural.get('name')}`: {natural.get('train_images')} training photos, " \
                f"{len(natural.get('val_files', []))} held out, cut into {_count(natural.get('val_crops'))} validation tiles"
    data += ")"
    if "mix" in dataset:
        data += "; each epoch " + " + ".join(f"{share:.0%} `{source}`" for source, share in dataset["mix"].items())
    lines.append(f"- **Training data:** {data}. Degradation: each 32×32 target reduced 4× by antialiased bilinear "
                 "resampling (`upgrader.imaging.downsample`)" + (", rounded to 8 bits." if recipe.get("quantize_inputs") else "."))
    lines.append(f"- **Recipe:** {_recipe_line(recipe)}; {manifest.get('epochs_completed', '?')} epochs, "
                 f"{manifest.get('wall_time_s', 0) / 60:.1f} minutes on {manifest.get('device_name') or manifest.get('device', '?')}.")
    if "init_from" in recipe:
        start = recipe["init_from"]
        lines.append(f"- **Started from:** `{start['name']}:{start['version']}` (sha256 `{start['weights_sha256'][:12]}…`).")
    lines.append(f"- **Weights:** `weights.safetensors`, sha256 `{manifest['weights_sha256'][:16]}…` "
                 f"({manifest.get('weights', 'last')} weights); evaluation {manifest.get('evaluation', 'on exact floats')}.")
    lines.append(f"- **Limits:** {_limits(arch['name'], manifest)}")
    lines.append(licence_line(manifest))
    lines += ["", *_metrics_table(metrics), ""]
    speed = manifest.get("speed")
    if speed:
        lines.append(f"Speed recorded in the manifest: {json.dumps(speed)}.")
        lines.append("")
    lines.append(f"Serve it: `curl -s -H 'Content-Type: image/png' -H 'Accept: image/png' --data-binary @examples/cat-8x8.png "
                 f"'http://127.0.0.1:8000/upscale?model={name}&version={version}' -o out.png`.")
    lines.append("")
    return "\n".join(lines)


def model_cards(root: Path = PRETRAINED) -> str:
    versions = shipped_versions(root)
    if not versions:
        return "No model is shipped in `pretrained/`."
    return "\n".join(model_card(name, version, manifest) for name, version, manifest in versions)
