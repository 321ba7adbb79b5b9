"""`python -m model_store [--store DIR|s3://bucket/prefix] ls|alias|verify|copy|gc|init`: the store from a terminal.

ls: models, versions, aliases and key metrics as a table; alias: promote or roll back;
verify: check every artifact's checksum; copy: a verified version of another store (e.g. the
repository's pretrained/, or a training run's directory) into this one as a new version; gc: remove
never-committed versions and stale temporary files older than the grace period; init: create the
directory or bucket (and with --seed, copy another store's models in).
"""

from __future__ import annotations

import argparse
import sys

from rich.console import Console
from rich.table import Table

from model_store.store import GC_GRACE_S, ModelStore, StoreError


def _metric(manifest: dict, *keys: str) -> str:
    value = manifest.get("metrics", {})
    for key in keys:
        if not isinstance(value, dict) or key not in value:
            return "-"
        value = value[key]
    return f"{value:.4f}" if isinstance(value, float) else str(value)


def _natural(manifest: dict) -> str:
    """The natural-photo validation PSNR (trainer --natural) with bicubic's, or "-" for versions without it."""
    model, bicubic = _metric(manifest, "natural", "model", "psnr"), _metric(manifest, "natural", "bicubic", "psnr")
    return "-" if model == "-" else f"{model} ({bicubic})"


def ls(store: ModelStore, console: Console) -> int:
    table = Table(title=f"Model store {store.url}")
    for column in ("model", "version", "aliases", "architecture", "params", "val MSE", "PSNR dB", "SSIM", "bicubic PSNR", "natural PSNR (bicubic)", "created"):
        table.add_column(column)
    for name in store.models():
        by_version: dict[int, list[str]] = {}
        for alias, version in store.aliases(name).items():
            by_version.setdefault(version, []).append(alias)
        for version in store.versions(name):
            try:
                m = store.manifest(name, version)
            except StoreError as exc:
                table.add_row(name, str(version), "", f"[red]{exc}[/red]", *[""] * 7)
                continue
            table.add_row(
                name, str(version), ",".join(by_version.get(version, [])), m.get("architecture", {}).get("name", "?"),
                f"{m.get('parameter_count', 0):,}", _metric(m, "model", "mse"), _metric(m, "model", "psnr"),
                _metric(m, "model", "ssim"), _metric(m, "bicubic", "psnr"), _natural(m), m.get("created_at", "?"),
            )
    console.print(table)
    return 0


def copy_version(store: ModelStore, source: ModelStore, spec: str, as_name: str | None, alias: str | None, console: Console) -> int:
    """Copy `name[:version]`. A bare name copies, before its latest version, the versions its aliases point at, with
    those aliases (a photo model's `clean` version travels with it: service/runtime/inputs.py)."""
    name, _, version = spec.partition(":")
    target = as_name or name
    aliases = {} if version else {a: v for a, v in source.aliases(name).items() if a != "latest"}
    newest = None if version else max(source.versions(name), default=None)
    for alias_name, number in sorted(((a, v) for a, v in aliases.items() if v != newest), key=lambda item: item[1]):
        copied = copy_one(store, source, f"{name}:{number}", target, console)
        if copied is None:
            return 1
        console.print(f"{target}:{alias_name} -> {store.set_alias(target, alias_name, copied)}")
    copied = copy_one(store, source, spec, target, console)
    if copied is None:
        return 1
    for alias_name in (a for a, v in aliases.items() if v == newest):
        console.print(f"{target}:{alias_name} -> {store.set_alias(target, alias_name, copied)}")
    if alias:
        console.print(f"{target}:{alias} -> {store.set_alias(target, alias, copied)}")
    return 0


def copy_one(store: ModelStore, source: ModelStore, spec: str, target: str, console: Console) -> int | None:
    """One version copied (or found already there) -> its number in `store`; None after printing why it failed."""
    name, _, version = spec.partition(":")
    try:
        number, copied = store.copy_from(source, name, version or "latest", as_name=target)
    except (StoreError, ValueError) as exc:  # either side: say which copy failed and why
        console.print(f"[red]error:[/red] copy {source.url} {spec} -> {store.url} {target}: {exc}")
        return None
    if copied:
        console.print(f"copied {source.url} {name}:{store.manifest(target, number)['copied_from']['version']} -> {store.url} {target}:{number}")
    else:
        console.print(f"{store.url} {target}:{number} already holds {source.url} {spec} (the same artifacts): nothing copied")
    return number


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m model_store", description=__doc__)
    parser.add_argument("--store", default=None, help="store: a directory or s3://bucket/prefix (default: $UPGRADER_STORE or ./store)")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("ls", help="list models, versions, aliases and metrics")
    alias = sub.add_parser("alias", help="point an alias at a version")
    alias.add_argument("model")
    alias.add_argument("alias")
    alias.add_argument("version")
    verify = sub.add_parser("verify", help="check every artifact's checksum")
    verify.add_argument("model")
    verify.add_argument("version", nargs="?", default="latest")
    copy = sub.add_parser("copy", help="copy a verified version of another store into this one (a new version here)")
    copy.add_argument("source_model", metavar="MODEL[:VERSION]", help="the version to copy (default: its latest)")
    copy.add_argument("--from", dest="source", required=True, help="the source store: a directory or s3://bucket/prefix")
    copy.add_argument("--as", dest="as_name", help="the model name here (default: the source's)")
    copy.add_argument("--alias", help="also point this alias at the copy (e.g. stable)")
    gc = sub.add_parser("gc", help="remove claimed-but-never-committed versions and stale temporary files")
    gc.add_argument("--grace-s", type=float, default=GC_GRACE_S,
                    help=f"only what is older than this many seconds (default {GC_GRACE_S:g}: a publisher may still be uploading)")
    gc.add_argument("--dry-run", action="store_true", help="list what would be removed, remove nothing")
    init = sub.add_parser("init", help="create the store (directory or bucket) if it does not exist")
    init.add_argument("--seed", metavar="STORE", help="then copy the latest version of each of this store's models in, unless "
                      "already there (e.g. the image's pretrained/, the model that ships with Upgrader); safe at every start")
    args = parser.parse_args(argv)
    store, console = ModelStore(args.store), Console(width=160, soft_wrap=True)  # a long store URL never breaks a line
    try:
        if args.command == "ls":
            return ls(store, console)
        if args.command == "init":
            store.init()
            console.print(f"store {store.url} is ready")
            if args.seed:
                seed = ModelStore(args.seed)
                if not seed.models():
                    console.print(f"[red]error:[/red] seed store {seed.url} holds no model")
                    return 1
                for name in seed.models():
                    if copy_version(store, seed, name, None, None, console):
                        return 1
            return 0
        if args.command == "gc":
            removed = store.gc(args.grace_s, dry_run=args.dry_run)
            for key in removed:
                console.print(f"{'would remove' if args.dry_run else 'removed'} {key}")
            console.print(f"{len(removed)} object(s) {'to remove' if args.dry_run else 'removed'} from {store.url}")
            return 0
        if args.command == "copy":
            return copy_version(store, ModelStore(args.source), args.source_model, args.as_name, args.alias, console)
        if args.command == "alias":
            console.print(f"{args.model}:{args.alias} -> {store.set_alias(args.model, args.alias, args.version)}")
            return 0
        manifest = store.verify(args.model, args.version)
        console.print(f"{args.model}:{manifest['version']} OK ({len(manifest['files'])} files verified)")
        return 0
    except StoreError as exc:
        console.print(f"[red]error:[/red] store {store.url}: {exc}")
        return 1


if __name__ == "__main__":
    sys.exit(main())
