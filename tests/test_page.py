"""The page (GET /) in a real browser: Debian's chromium driven by Playwright against a real uvicorn server.

Browsers are never downloaded: Playwright launches /usr/bin/chromium (`.ci/run` installs it). Every run
saves screenshots to screenshots/ (git-ignored) so a person can look at what the tests saw.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import httpx
import numpy as np
import pytest
from test_service_support import LiveServer, png_bytes, publish

from model_store import ModelStore

CHROMIUM = "/usr/bin/chromium"
ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update", "--no-first-run"]
EXAMPLES = Path(__file__).resolve().parent.parent / "service" / "static" / "examples"
SCREENSHOTS = Path(__file__).resolve().parent.parent / "screenshots"
LOSS_CURVE = png_bytes(np.full((60, 90, 3), 200, np.uint8))
MODELS = ["conv", "fc", "subpixel_residual"]


@pytest.fixture(scope="module")
def browser():
    if not Path(CHROMIUM).exists() or shutil.which("chromium") is None:
        pytest.fail(f"{CHROMIUM} not found: install Debian's chromium (apt-get install chromium; .ci/run does)")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        yield browser
        browser.close()


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    store = ModelStore(tmp_path_factory.mktemp("page") / "store")
    publish(store, "conv", "conv", seed=1, psnr=21.0, files={"loss_curve.png": LOSS_CURVE})
    publish(store, "conv", "conv", seed=2, psnr=21.5, recipe={"init_from": {"name": "conv", "version": 1, "psnr": 21.0}})
    publish(store, "fc", "fc", seed=3, psnr=19.0)
    publish(store, "subpixel_residual", "subpixel_residual", seed=4, psnr=22.5)
    store.set_alias("conv", "stable", 1)
    return store


@pytest.fixture(scope="module")
def live(store):
    with LiveServer(store=store.root, poll_interval_s=60, max_image_pixels=128 * 128) as server:
        yield server


@pytest.fixture()
def page(browser, request):
    context = browser.new_context(viewport={"width": 1280, "height": 900})
    page = context.new_page()
    errors: list[str] = []
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    yield page
    SCREENSHOTS.mkdir(exist_ok=True)
    page.screenshot(path=str(SCREENSHOTS / f"{request.node.name}.png"), full_page=True)
    context.close()
    assert not errors, f"JavaScript errors on the page: {errors}"


def api_answer(live, path: str, example: str) -> dict:
    files = [("images", ("i.png", (EXAMPLES / f"{example}-64x64.png").read_bytes(), "image/png")),
             ("references", ("r.png", (EXAMPLES / f"{example}-256x256.png").read_bytes(), "image/png"))]
    response = httpx.post(live.url + path, files=files, timeout=60)
    assert response.status_code == 200, response.text
    return response.json()


def natural_sizes(page) -> dict[str, list[int]]:
    return page.eval_on_selector_all(".card.done, .card[data-kind=input], .card[data-kind=reference]",
                                     "cards => Object.fromEntries(cards.map(c => [c.dataset.model || c.dataset.kind, "
                                     "[c.querySelector('img:not(.before)').naturalWidth, c.querySelector('img:not(.before)').naturalHeight]]))")


def wait_for_results(page, count: int) -> None:
    page.wait_for_function(f"document.querySelectorAll('.card.done').length + document.querySelectorAll('.card.failed').length >= {count}",
                           timeout=60_000)


def test_an_example_through_every_model_matches_the_api(live, page):
    page.goto(live.url + "/")
    page.wait_for_selector("#model-choices select[data-model=conv]")
    page.click("button[data-example=astronaut]")
    wait_for_results(page, len(MODELS) + 1)  # every model and bicubic
    assert page.locator(".card.failed").count() == 0
    sizes = natural_sizes(page)
    assert sizes["input"] == [64, 64] and sizes["reference"] == [256, 256]
    assert all(sizes[name] == [256, 256] for name in MODELS + ["bicubic"]), sizes
    # Crisp pixels: the enlarged pictures are not smoothed by the browser.
    assert page.eval_on_selector(".card[data-model=conv] img.after", "img => getComputedStyle(img).imageRendering") == "pixelated"
    for name in MODELS + ["bicubic"]:
        path = "/bicubic?tile=true" if name == "bicubic" else f"/upscale?tile=true&model={name}"
        expected = api_answer(live, path, "astronaut")
        card = page.locator(f".card[data-model={name}]")
        assert float(card.get_attribute("data-psnr")) == expected["images"][0]["psnr"]
        assert float(card.get_attribute("data-ssim")) == expected["images"][0]["ssim"]
        text = card.inner_text()
        assert f"PSNR {expected['images'][0]['psnr']:.2f} dB" in text and f"SSIM {expected['images'][0]['ssim']:.3f}" in text
        assert "ms on the server" in text
        # The download is exactly the API's PNG.
        href = card.locator("a[download]").get_attribute("href")
        downloaded = page.evaluate("async url => { const b = new Uint8Array(await (await fetch(url)).arrayBuffer()); "
                                   "let s = ''; b.forEach(x => s += String.fromCharCode(x)); return btoa(s); }", href)
        assert downloaded == expected["images"][0]["png"]
    assert "batch of" in page.locator(".card[data-model=subpixel_residual]").inner_text()


def test_switching_versions_and_the_ensemble_reruns_with_the_choice(live, page):
    page.goto(live.url + "/")
    page.wait_for_selector("#model-choices select[data-model=conv]")
    for other in ("fc", "subpixel_residual"):
        page.uncheck(f"#use-{other}")
    page.click("button[data-example=chelsea]")
    wait_for_results(page, 2)
    assert page.locator(".card[data-model=conv] h3").inner_text() == "conv v2"  # latest
    page.select_option("#model-choices select[data-model=conv]", "stable")
    page.wait_for_function("document.querySelector('.card[data-model=conv].done h3')?.textContent === 'conv v1'", timeout=60_000)
    expected = api_answer(live, "/upscale?tile=true&model=conv&version=1", "chelsea")["images"][0]
    assert float(page.locator(".card[data-model=conv]").get_attribute("data-psnr")) == expected["psnr"]
    for size in ("4", "8"):
        page.select_option("#ensemble", size)
        expected = api_answer(live, f"/upscale?tile=true&model=conv&version=1&ensemble={size}", "chelsea")["images"][0]
        page.wait_for_function(f"document.querySelector('.card[data-model=conv].done')?.dataset.psnr === '{expected['psnr']}'", timeout=60_000)
        assert f"{size}-view ensemble" in page.locator("#summary").inner_text()


def test_an_upload_shrunk_4x_is_measured_against_itself_and_api_errors_are_plain_words(live, page, tmp_path):
    page.goto(live.url + "/")
    page.wait_for_selector("#model-choices select[data-model=conv]")
    photo = tmp_path / "photo.png"
    photo.write_bytes((EXAMPLES / "astronaut-256x256.png").read_bytes())
    page.set_input_files("#file", str(photo))
    wait_for_results(page, len(MODELS) + 1)
    sizes = natural_sizes(page)
    assert sizes["input"] == [64, 64] and sizes["reference"] == [256, 256] and sizes["conv"] == [256, 256]
    assert page.locator(".card[data-model=conv]").get_attribute("data-psnr") is not None
    # Too large for this server (max 128x128 input pixels) when not shrunk: the API's 413 in plain words.
    page.uncheck("#downscale")
    big = tmp_path / "big.png"
    big.write_bytes(png_bytes(np.random.default_rng(0).integers(0, 256, (200, 200, 3), dtype=np.uint8)))
    page.set_input_files("#file", str(big))
    page.wait_for_selector("#error:not([hidden])")
    assert "The image is too large for this server." in page.inner_text("#error")
    assert "40000 pixels" in page.inner_text("#error")
    # the error shows with the first refusal; every card fails as its own answer comes back
    page.wait_for_function(f"document.querySelectorAll('.card.failed').length === {len(MODELS) + 1}", timeout=30_000)


def test_the_page_asks_for_an_api_key_when_the_api_says_401(store, browser):
    with LiveServer(store=store.root, poll_interval_s=60, api_keys="sekrit") as server:
        context = browser.new_context(viewport={"width": 1000, "height": 800})
        page = context.new_page()
        page.goto(server.url + "/")  # the page itself needs no key; GET /models does, so it asks at once
        page.wait_for_selector("#key-form:not([hidden])")
        page.fill("#key-input", "wrong")
        page.click("#key-form button")
        page.wait_for_selector("#key-form:not([hidden])")
        assert "not accepted" in page.inner_text("#key-note")
        page.fill("#key-input", "sekrit")
        page.click("#key-form button")
        page.wait_for_selector("#model-choices select[data-model=conv]")
        page.click("button[data-example=cat]")  # the key is kept: no second prompt
        wait_for_results(page, len(MODELS) + 1)
        assert page.locator("#key-form").is_hidden()
        assert page.locator(".card.failed").count() == 0
        assert natural_sizes(page)["conv"] == [32, 32]
        SCREENSHOTS.mkdir(exist_ok=True)
        page.screenshot(path=str(SCREENSHOTS / "api_key.png"), full_page=True)
        # The trainer's pictures need the key too: fetched with it, not by a bare <img src>.
        page.click("#tab-models")
        page.locator(".model[data-model=conv] tr.version[data-version='1'] .pictures-toggle").click()
        page.wait_for_function("document.querySelector(\".model[data-model=conv] tr.pictures[data-version='1'] img[alt$='loss_curve.png']\")"
                               "?.naturalWidth === 90")
        context.close()


def test_models_view_shows_metrics_aliases_lineage_and_pictures(live, page):
    listing = httpx.get(live.url + "/models").json()
    page.goto(live.url + "/#models")
    page.wait_for_selector(".model[data-model=conv] tr.version[data-version='1']")
    for model in listing["models"]:
        section = page.locator(f".model[data-model={model['name']}]")
        for version in model["versions"]:
            row = section.locator(f"tr.version[data-version='{version['version']}']")
            text = row.inner_text()
            m, b = version["metrics"]["model"], version["metrics"]["bicubic"]
            assert f"{m['psnr']:.2f} ({b['psnr']:.2f}, {m['psnr'] - b['psnr']:+.2f})" in text
            assert ("fine-tuned" if version["recipe"].get("init_from") else "trained from scratch") in text and "cifar10-jpeg" in text
    assert "stable → v1" in page.locator(".model[data-model=conv] p").inner_text()
    assert "default" in page.locator(".model[data-model=subpixel_residual] h2").inner_text()
    page.locator(".model[data-model=conv] tr.version[data-version='1'] .pictures-toggle").click()
    pictures = ".model[data-model=conv] tr.pictures[data-version='1']"
    page.wait_for_function(f"document.querySelector(\"{pictures} img[alt$='loss_curve.png']\")?.naturalWidth === 90")
    page.wait_for_function(f"document.querySelector(\"{pictures} .muted\")?.textContent.includes('no samples.png')")
    assert "fine-tuned from conv v1" in page.locator(".model[data-model=conv] tr.version[data-version='2']").inner_text()


def test_usable_at_phone_width(live, browser):
    context = browser.new_context(viewport={"width": 390, "height": 844}, device_scale_factor=2, is_mobile=True, has_touch=True)
    page = context.new_page()
    page.goto(live.url + "/")
    page.wait_for_selector("#model-choices select[data-model=conv]")
    page.click("button[data-example=astronaut]")
    wait_for_results(page, len(MODELS) + 1)
    assert page.evaluate("document.documentElement.scrollWidth") <= 390  # nothing wider than the screen
    box = page.locator(".card[data-model=conv] img.after").bounding_box()
    assert 100 < box["width"] <= 390
    SCREENSHOTS.mkdir(exist_ok=True)
    page.screenshot(path=str(SCREENSHOTS / "phone.png"), full_page=True)
    page.click("#tab-models")
    assert page.evaluate("document.documentElement.scrollWidth") <= 390
    context.close()


# ---- photo models, output formats, before/after ---------------------------------------------------------
@pytest.fixture(scope="module")
def photo_live(tmp_path_factory):
    from test_service_wholeimage import publish_photo

    store = ModelStore(tmp_path_factory.mktemp("page-photo") / "store")
    publish(store, "conv", "conv", seed=1, psnr=21.0)
    publish_photo(store, "photo")
    with LiveServer(store=store.root, poll_interval_s=60, max_image_pixels=128 * 128) as server:
        yield server


def test_a_photo_model_in_the_chosen_format_with_a_before_after_slider(photo_live, page):
    page.goto(photo_live.url + "/")
    page.wait_for_selector("#model-choices select[data-model=photo]")
    badge = page.locator("label[for=use-photo] .badge.photo")
    assert badge.inner_text() == "photos" and "bicubic-matlab-x4" in badge.get_attribute("title")
    assert page.locator("label[for=use-conv] .badge.photo").count() == 0
    page.select_option("#format", "webp")
    page.click("button[data-example=astronaut]")
    wait_for_results(page, 3)  # photo, conv and bicubic
    assert page.locator(".card.failed").count() == 0
    sizes = natural_sizes(page)
    assert sizes["photo"] == [256, 256] and sizes["conv"] == [256, 256]
    card = page.locator(".card[data-model=photo]")
    assert card.get_attribute("data-format") == "image/webp"
    # The download is exactly the API's WebP (the whole image in one forward: no tiles).
    expected = api_answer(photo_live, "/upscale?tile=true&model=photo&format=webp", "astronaut")["images"][0]
    assert expected["media_type"] == "image/webp" and float(card.get_attribute("data-psnr")) == expected["psnr"]
    link = card.locator("a[download]")
    assert link.get_attribute("download").endswith(".webp") and link.inner_text() == "Download WEBP"
    downloaded = page.evaluate("async url => { const b = new Uint8Array(await (await fetch(url)).arrayBuffer()); "
                               "let s = ''; b.forEach(x => s += String.fromCharCode(x)); return btoa(s); }", link.get_attribute("href"))
    assert downloaded == expected["data"]
    # Before/after: the input over the output's left half; the slider moves the edge.
    before = card.locator(".frame.compare img.before")
    assert before.evaluate("img => img.naturalWidth") == 64
    box, after = before.bounding_box(), card.locator(".frame img.after").bounding_box()
    assert all(abs(box[k] - after[k]) < 1 for k in ("x", "y", "width", "height")), (box, after)  # exactly over the output
    card.locator("input.slider").fill("20")
    assert before.evaluate("img => img.style.clipPath") == "inset(0px 80% 0px 0px)"
    # Another format reruns: JPEG comes back as JPEG.
    page.select_option("#format", "jpeg:90")
    page.wait_for_function("document.querySelector('.card[data-model=photo].done')?.dataset.format === 'image/jpeg'", timeout=60_000)
    assert page.locator(".card[data-model=photo] a[download]").get_attribute("download").endswith(".jpg")
