"""`upgrader upscale` as a subprocess against a real service (`python -m service` on a copy of the shipped models, at most
64x64 input pixels per photo): bad files reported one by one while the others finish, a service restarted mid-run,
resume, --overwrite, OUTDIRs that cannot be written, JSON lines or a progress bar, exit codes, and --local giving the
server's pixels."""

from __future__ import annotations

import json
import os
import pty
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from client_support import (
    API_KEY,
    PROJECT_ROOT,
    by_name,
    cli_command,
    code_blocks,
    encode,
    json_lines,
    photo_arrays,
    pixels,
    run_cli,
    seeded_store,
    service,
    write_photos,
)
from PIL import Image
from test_service_support import ServiceProcess

MAX_PIXELS = 64 * 64  # UPGRADER_MAX_WHOLE_IMAGE_PIXELS of the test service: a 72x72 photo is over the limit


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    return seeded_store(tmp_path_factory.mktemp("cli"))


@pytest.fixture(scope="module")
def live(store):
    with service(store, UPGRADER_MAX_WHOLE_IMAGE_PIXELS=str(MAX_PIXELS)) as run:
        yield run


@pytest.fixture()
def env(live):
    return {"UPGRADER_URL": live.url, "UPGRADER_API_KEY": API_KEY}


def no_partial_files(root: Path) -> bool:
    return not [p for p in root.rglob("*") if p.name.endswith(".part") or p.name.startswith(".upgrader-probe-")]


def test_bad_files_are_reported_one_by_one_while_the_others_finish(tmp_path, env):
    inputs = tmp_path / "in"
    good = write_photos(inputs, 3) + write_photos(inputs / "sub" / "deeper", 2, prefix="nested")
    real = encode(photo_arrays(1)[0])
    (inputs / "corrupt.png").write_bytes(real[: len(real) // 2])
    (inputs / "notes.png").write_text("not an image\n")
    (inputs / "empty.png").write_bytes(b"")
    frames = [Image.fromarray(a) for a in photo_arrays(2, sizes=(32,))]
    frames[0].save(inputs / "animated.gif", save_all=True, append_images=frames[1:], duration=100, loop=0)
    (inputs / "big.png").write_bytes(encode(np.full((72, 72, 3), 128, np.uint8)))
    (inputs / "readme.txt").write_text("not an image suffix: not an input\n")
    out = tmp_path / "out"

    result = run_cli("upscale", str(inputs), "--recursive", "-o", str(out), env=env)

    assert result.returncode == 1, result.stderr
    records = json_lines(result.stdout)
    files, summary = by_name(records), records[-1]
    assert [r["event"] for r in records] == ["file"] * 10 + ["summary"]
    for path in good:
        record = files[path.name]
        output = out / path.relative_to(inputs).with_suffix(".png")
        assert record["status"] == "done" and record["output"] == str(output) and output.is_file()
        width, height = Image.open(path).size
        assert (record["width"], record["height"]) == Image.open(output).size == (4 * width, 4 * height)
        assert (record["model"], record["version"]) == ("photo", 2)
    expected = {"corrupt.png": (400, "corrupt_image"), "notes.png": (415, "unsupported_image"), "empty.png": (400, "empty_image"),
                "animated.gif": (422, "animated_image"), "big.png": (413, "dimensions_too_large")}
    for name, (status, code) in expected.items():
        error = files[name]["error"]
        assert (files[name]["status"], error["status"], error["code"]) == ("failed", status, code), files[name]
        assert error["message"] and not (out / name).with_suffix(".png").exists()
    assert "readme.txt" not in files
    assert (summary["done"], summary["skipped"], summary["failed"], summary["files"]) == (5, 0, 5, 10)
    assert {f["input"] for f in summary["failures"]} == {str(inputs / name) for name in expected}
    assert "2 frames" in files["animated.gif"]["error"]["message"]
    assert no_partial_files(out)


def test_resume_skips_done_files_and_overwrite_does_them_again(tmp_path, env):
    inputs = write_photos(tmp_path / "in", 3)
    out = tmp_path / "out"
    first = run_cli("upscale", str(tmp_path / "in"), "-o", str(out), env=env)
    assert first.returncode == 0, first.stderr
    outputs = sorted(out.iterdir())
    assert [p.name for p in outputs] == [p.with_suffix(".png").name for p in inputs]
    written = {p.name: p.stat().st_mtime_ns for p in outputs}
    outputs[1].unlink()  # as if a run had been stopped before it

    second = run_cli("upscale", str(tmp_path / "in"), "-o", str(out), env=env)
    assert second.returncode == 0, second.stderr
    statuses = {name: r["status"] for name, r in by_name(json_lines(second.stdout)).items()}
    assert statuses == {inputs[0].name: "skipped", inputs[1].name: "done", inputs[2].name: "skipped"}
    assert out.joinpath(outputs[0].name).stat().st_mtime_ns == written[outputs[0].name]

    third = run_cli("upscale", str(tmp_path / "in"), "-o", str(out), "--overwrite", env=env)
    assert third.returncode == 0 and json_lines(third.stdout)[-1]["done"] == 3
    assert out.joinpath(outputs[0].name).stat().st_mtime_ns != written[outputs[0].name]


def test_files_folders_and_globs_keep_their_layout_with_the_formats_extension(tmp_path, env):
    write_photos(tmp_path / "in", 2)
    write_photos(tmp_path / "in" / "sub", 1, prefix="nested")
    single = write_photos(tmp_path / "loose", 1, prefix="single")[0]
    out = tmp_path / "out"
    result = run_cli("upscale", str(tmp_path / "in"), str(tmp_path / "in" / "*" / "*.png"), str(single), "-o", str(out),
                     "--format", "jpeg", "--quality", "80", env=env)
    assert result.returncode == 0, result.stderr
    written = sorted(str(p.relative_to(out)) for p in out.rglob("*") if p.is_file())
    # the folder without --recursive: its own images; the glob: below its fixed part (in/); the file: by its name
    assert written == ["photo00.jpg", "photo01.jpg", "single00.jpg", "sub/nested00.jpg"]
    assert all(Image.open(out / name).format == "JPEG" for name in written)

    (tmp_path / "in" / "photo00.jpg").write_bytes((out / "photo00.jpg").read_bytes())  # two inputs, one output
    clash = run_cli("upscale", str(tmp_path / "in"), "-o", str(tmp_path / "out2"), env=env)
    assert clash.returncode == 2 and "would both be written to" in clash.stderr and not (tmp_path / "out2").exists()


def test_a_service_restarted_mid_run_loses_no_file(tmp_path, store):
    inputs = write_photos(tmp_path / "in", 20, sizes=(64,))
    out = tmp_path / "out"
    first = ServiceProcess(store.url, env={"UPGRADER_WORKERS": "1"})
    port = int(first.url.rsplit(":", 1)[1])
    first.wait_ready()
    run = subprocess.Popen(cli_command("upscale", str(tmp_path / "in"), "-o", str(out), "--jobs", "1", "--retries", "20", "--url", first.url),
                           env=os.environ, cwd=PROJECT_ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    second = None
    try:
        deadline = time.monotonic() + 120
        while len(list(out.glob("*.png"))) < 3:
            assert run.poll() is None and time.monotonic() < deadline, run.stderr.read() if run.poll() is not None else "no output"
            time.sleep(0.01)
        first.process.send_signal(signal.SIGKILL)  # mid-request, mid-run: connections reset, then refused
        first.stop()
        done_before = len(list(out.glob("*.png")))
        assert run.poll() is None and done_before < len(inputs), "the run ended before the service was killed"
        second = ServiceProcess(store.url, port=port, env={"UPGRADER_WORKERS": "1"})
        second.wait_ready()
        stdout, stderr = run.communicate(timeout=180)
    finally:
        if run.poll() is None:
            run.kill()
        if second is not None:
            second.stop()
    assert run.returncode == 0, stderr
    summary = json_lines(stdout)[-1]
    assert (summary["done"], summary["failed"]) == (len(inputs), 0)
    assert sorted(p.name for p in out.iterdir()) == [p.with_suffix(".png").name for p in inputs]
    assert all(Image.open(out / p.name).size == (256, 256) for p in inputs)


def test_an_outdir_that_is_a_file_or_below_one_is_refused_before_any_request(tmp_path, env):
    write_photos(tmp_path / "in", 1)
    a_file = tmp_path / "taken"
    a_file.write_text("a file where OUTDIR should be\n")
    result = run_cli("upscale", str(tmp_path / "in"), "-o", str(a_file), env=env)
    assert result.returncode == 2 and f"OUTDIR {a_file} exists and is not a folder" in result.stderr and result.stdout == ""
    below = run_cli("upscale", str(tmp_path / "in"), "-o", str(a_file / "sub"), env=env)
    assert below.returncode == 2 and "is not writable" in below.stderr and "Not a directory" in below.stderr


def test_a_read_only_outdir_is_refused_before_any_request(tmp_path, env):
    """A read-only bind mount (in a user and mount namespace: root ignores file modes, not a read-only mount)."""
    write_photos(tmp_path / "in", 1)
    readonly = tmp_path / "readonly"
    readonly.mkdir()
    probe = subprocess.run(["unshare", "-rm", "sh", "-c", f"mount --bind -o ro {readonly} {readonly}"], capture_output=True, text=True)
    if probe.returncode != 0:
        pytest.skip(f"no read-only bind mount here (unshare -rm: {probe.stderr.strip()}); the regular-file OUTDIR test still runs")
    command = " ".join(cli_command("upscale", str(tmp_path / "in"), "-o", str(readonly)))
    result = subprocess.run(["unshare", "-rm", "sh", "-c", f"mount --bind -o ro {readonly} {readonly} && exec {command}"],
                            env={**os.environ, **env}, cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and f"OUTDIR {readonly} is not writable: Read-only file system" in result.stderr, result.stderr
    assert result.stdout == "" and list(readonly.iterdir()) == []


def test_bad_usage_exits_2_naming_what_is_wrong(tmp_path, env):
    write_photos(tmp_path / "in", 1)
    cases = {
        ("upscale", str(tmp_path / "in")): "required: -o/--output",
        ("upscale", str(tmp_path / "missing"), "-o", str(tmp_path / "o")): "no such file or folder",
        ("upscale", str(tmp_path / "in" / "*.jpg"), "-o", str(tmp_path / "o")): "matches no file",
        ("upscale", str(tmp_path / "in"), "-o", str(tmp_path / "o"), "--quality", "0"): "--quality must be 1-100",
        ("upscale", str(tmp_path / "in"), "-o", str(tmp_path / "o"), "--jobs", "0"): "must be >= 1",
        ("upscale", str(tmp_path / "in"), "-o", str(tmp_path / "o"), "--format", "gif"): "invalid choice",
        ("upscale", str(tmp_path / "in"), "-o", str(tmp_path / "o"), "--model", "nope"): "no such model; it has photo, upgrader",
        ("upscale", str(tmp_path / "in"), "-o", str(tmp_path / "o"), "--store", "x"): "--store names the store of --local",
        ("upscale", str(tmp_path / "in"), "-o", str(tmp_path / "o"), "--api-key", "wrong"): "unauthorized",
    }
    for args, message in cases.items():
        result = run_cli(*args, env=env)
        assert result.returncode == 2 and message in result.stderr, (args, result.returncode, result.stderr)
    assert not list((tmp_path / "o").glob("*.png")) if (tmp_path / "o").exists() else True


def test_an_unreachable_service_exits_1(tmp_path):
    write_photos(tmp_path / "in", 1)
    result = run_cli("upscale", str(tmp_path / "in"), "-o", str(tmp_path / "o"), "--url", "http://127.0.0.1:9", "--retries", "1")
    assert result.returncode == 1 and "unreachable" in result.stderr and "2 tries" in result.stderr


def test_a_terminal_gets_a_progress_bar_and_a_summary_table(tmp_path, env):
    write_photos(tmp_path / "in", 2)
    (tmp_path / "in" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n broken")
    leader, follower = pty.openpty()
    process = subprocess.Popen(cli_command("upscale", str(tmp_path / "in"), "-o", str(tmp_path / "out")), env={**os.environ, **env,
                               "COLUMNS": "160"}, cwd=PROJECT_ROOT, stdout=follower, stderr=follower)
    os.close(follower)
    chunks: list[bytes] = []

    def read() -> None:
        while True:
            try:
                chunk = os.read(leader, 65536)
            except OSError:  # EIO: the command exited and closed the terminal
                return
            if not chunk:
                return
            chunks.append(chunk)

    reader = threading.Thread(target=read)
    reader.start()
    assert process.wait(timeout=120) == 1
    reader.join(10)
    os.close(leader)
    screen = b"".join(chunks).decode(errors="replace")
    assert "upscaling" in screen and "MP/s" in screen and "ETA" in screen and "1 failed" in screen
    assert "done" in screen and "skipped" in screen and "corrupt_image" in screen and "broken.png" in screen
    assert '"event"' not in screen  # no JSON lines on a terminal
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["photo00.png", "photo01.png"]


def test_local_gives_the_servers_pixels_without_a_server(tmp_path, env):
    inputs = write_photos(tmp_path / "in", 2)
    served, local = tmp_path / "served", tmp_path / "local"
    assert run_cli("upscale", str(tmp_path / "in"), "-o", str(served), env=env).returncode == 0
    result = run_cli("upscale", str(tmp_path / "in"), "-o", str(local), "--local", env={"UPGRADER_URL": "http://127.0.0.1:9"})
    assert result.returncode == 0, result.stderr
    assert [(r["status"], r["model"], r["version"]) for r in json_lines(result.stdout)[:-1]] == [("done", "photo", 2)] * 2
    for path in inputs:
        name = path.with_suffix(".png").name
        assert np.array_equal(pixels(local / name), pixels(served / name)), name


def test_the_upgrader_console_script_is_installed():
    script = Path(sys.executable).parent / "upgrader"
    assert script.is_file(), f"{script} missing: pip install -e . installs it ([project.scripts] in pyproject.toml)"
    shown = subprocess.run([str(script), "upscale", "--help"], capture_output=True, text=True, timeout=60)
    assert shown.returncode == 0 and "--local" in shown.stdout and "OUTDIR" in shown.stdout


def test_every_command_example_in_the_client_page_runs(tmp_path, env):
    """docs/client.md's `upgrader` lines, in order, with bash, in a folder holding photos/ (and photos/sub/) and photo.jpg;
    its JSON lines have the fields the command writes."""
    page = PROJECT_ROOT / "docs" / "client.md"
    photos = photo_arrays(3)
    write_photos(tmp_path / "photos", 2)
    (tmp_path / "photos" / "sub").mkdir()
    (tmp_path / "photos" / "sub" / "deep.jpg").write_bytes(encode(photos[2], "JPEG", quality=95))
    (tmp_path / "photo.jpg").write_bytes(encode(photos[0], "JPEG", quality=95))
    lines = [line for block in code_blocks(page, "bash") for line in block.splitlines() if line.startswith("upgrader ")]
    assert len(lines) == 5
    path = f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"
    for line in lines:
        run = subprocess.run(["bash", "-c", line], cwd=tmp_path, env={**os.environ, **env, "PATH": path}, capture_output=True,
                             text=True, timeout=180)
        assert run.returncode == 0, f"{line}\n{run.stderr}"
    big = sorted(str(p.relative_to(tmp_path / "big")) for p in (tmp_path / "big").rglob("*") if p.is_file())
    assert big == ["photo.png", "photo00.png", "photo00.webp", "photo01.png", "photo01.webp", "sub/deep.jpg", "sub/deep.webp"]
    written = json_lines((tmp_path / "upscaled.jsonl").read_text())
    assert [r.get("status") for r in written] == ["done", "done", None] and written[-1]["event"] == "summary"
    documented = [json.loads(line) for block in code_blocks(page, "json") for line in block.splitlines()]
    real = {"done": written[0], "summary": written[-1]}
    for record in documented:
        key = "summary" if record["event"] == "summary" else record["status"]
        if key in real:
            assert record.keys() == real[key].keys(), key
        elif key == "skipped":
            assert record.keys() == {"event", "input", "output", "status"}
        else:
            assert key == "failed" and record.keys() == {"event", "input", "output", "status", "error"}
            assert record["error"].keys() == {"code", "message", "item", "status"}
