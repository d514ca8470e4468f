"""The Space in a real headless Chromium (Debian's /usr/bin/chromium, driven by Playwright; no `playwright install`).

The app runs as its own process exactly as on a Space (``python spaces/app.py --model <checkpoint>``), so it loads the
model through the checkpoint's remote code. The checkpoint carries demo examples and records that it learned region
captions and grounding only (as a trained one does), so the page opens with examples and an Ask tab that says no. Screenshots go to the test's tmp dir, and also to $GRANVIT_SCREENSHOT_DIR
when that is set (to look at them after a run).
"""

import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from PIL import Image

CHROMIUM = Path("/usr/bin/chromium")
APP = Path(__file__).resolve().parent.parent / "spaces" / "app.py"

# ~50 s on 2 busy cores, most of it the app process importing torch/transformers/gradio and loading the model.
pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        not CHROMIUM.exists(), reason="Debian chromium missing: apt-get install -y chromium (.ci/run does it)"
    ),
]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def checkpoint(tiny_checkpoint, tmp_path_factory):
    import json

    from granvit.spaces.demo_examples import write_demo_examples

    folder = tmp_path_factory.mktemp("space-ckpt") / "granvit"
    shutil.copytree(tiny_checkpoint, folder)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "trained_tasks": ["bbox2caption", "caption2bbox"]}))
    image = Image.new("RGB", (320, 240), "white")
    image.paste((20, 160, 20), (30, 30, 150, 130))
    write_demo_examples(folder, [{"image": image, "width": 320, "height": 240, "image_id": "green",
                                  "regions": [{"bbox": [30, 30, 150, 130], "caption": "a green square"},
                                              {"bbox": [0, 0, 320, 240], "caption": "the whole picture"}]}])
    return folder


@pytest.fixture(scope="module")
def app_url(checkpoint, tmp_path_factory):
    port = free_port()
    log = tmp_path_factory.mktemp("space-log") / "app.log"
    env = {**os.environ, "PORT": str(port), "HOST": "127.0.0.1", "GRADIO_ANALYTICS_ENABLED": "False"}
    with open(log, "w") as out:
        server = subprocess.Popen(
            [sys.executable, str(APP), "--model", str(checkpoint)], env=env, stdout=out, stderr=subprocess.STDOUT
        )
    url = f"http://127.0.0.1:{port}/"
    try:
        deadline = time.monotonic() + 60
        while True:
            if server.poll() is not None:
                pytest.fail(f"the app exited with {server.returncode}:\n{log.read_text()[-3000:]}")
            try:
                urllib.request.urlopen(url, timeout=2)
                break
            except (urllib.error.URLError, ConnectionError):
                if time.monotonic() > deadline:
                    pytest.fail(f"the app did not answer within 60 s:\n{log.read_text()[-3000:]}")
                time.sleep(0.5)
        yield url
    finally:
        server.terminate()
        server.wait(timeout=30)


@pytest.fixture(scope="module")
def page(app_url):
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(
            executable_path=str(CHROMIUM),
            headless=True,
            args=["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                  "--disable-sync", "--no-first-run"],
        )
        page = browser.new_page(viewport={"width": 1280, "height": 1400})
        page.goto(app_url, wait_until="domcontentloaded")
        yield page
        browser.close()


@pytest.fixture(scope="module")
def image_file(tmp_path_factory):
    image = Image.new("RGB", (320, 240), "white")
    image.paste((200, 20, 20), (40, 40, 140, 120))
    image.paste((20, 20, 200), (180, 100, 300, 220))
    path = tmp_path_factory.mktemp("space-img") / "shapes.png"
    image.save(path)
    return path


def screenshot(page, tmp_path, name):
    path = tmp_path / name
    page.screenshot(path=str(path), full_page=True)
    if os.environ.get("GRANVIT_SCREENSHOT_DIR"):
        target = Path(os.environ["GRANVIT_SCREENSHOT_DIR"])
        target.mkdir(parents=True, exist_ok=True)
        shutil.copy(path, target / name)
    return path


def draw_box(page, annotator_id, image_file):
    """Upload into an image_annotator and drag one box (its edit dialog is disabled in the app)."""
    page.locator(f"#{annotator_id} input[type=file]").set_input_files(str(image_file))
    canvas = page.locator(f"#{annotator_id} canvas").first
    canvas.wait_for(timeout=15000)
    # The image is centred in the canvas: a drag that starts on the margin draws nothing, so drag around the centre.
    area = canvas.bounding_box()
    cx, cy = area["x"] + area["width"] / 2, area["y"] + area["height"] / 2
    page.mouse.move(cx - 60, cy - 40)
    page.mouse.down()
    page.mouse.move(cx + 50, cy + 40, steps=10)
    page.mouse.up()


def test_draw_a_box_and_get_its_caption(page, image_file, tmp_path):
    from playwright.sync_api import expect

    draw_box(page, "describe_in", image_file)
    page.locator("#describe_btn").click()
    result = page.locator("#describe_json")
    expect(result).to_contain_text('"caption"', timeout=20000)  # the JSON key, not the component's label
    expect(result).to_contain_text('"box"')
    expect(page.locator("#describe_img img")).to_have_count(2)  # the image + one box mask
    assert screenshot(page, tmp_path, "space_describe_regions.png").stat().st_size > 0


def test_find_a_phrase_draws_a_box(page, image_file, tmp_path):
    from playwright.sync_api import expect

    page.get_by_role("tab", name="Find").click()
    page.locator("#find_in input[type=file]").set_input_files(str(image_file))
    page.locator("#find_in img").first.wait_for(timeout=15000)
    page.locator("#find_text textarea").fill("the red square")
    page.locator("#find_btn").click()
    expect(page.locator("#find_json")).to_contain_text('"boxes"', timeout=20000)
    expect(page.locator("#find_img img")).to_have_count(2)  # the image + the predicted box
    expect(page.locator("#find_img")).to_contain_text("1: the red square")  # the box's legend entry
    assert screenshot(page, tmp_path, "space_find.png").stat().st_size > 0


def test_empty_phrase_shows_an_error(page, tmp_path):
    from playwright.sync_api import expect

    page.get_by_role("tab", name="Find").click()  # the image from the test above is still loaded
    page.locator("#find_text textarea").fill("")
    page.locator("#find_btn").click()
    expect(page.get_by_text("Empty phrase: type a phrase first.")).to_be_visible(timeout=15000)
    screenshot(page, tmp_path, "space_error.png")


def test_region_similarity_heatmap(page, image_file, tmp_path):
    from playwright.sync_api import expect

    page.get_by_role("tab", name="Region similarity").click()
    draw_box(page, "sim_in", image_file)
    page.locator("#sim_btn").click()
    expect(page.locator("#sim_json")).to_contain_text('"mean_inside"', timeout=20000)
    expect(page.locator("#sim_img img")).to_have_count(1)
    screenshot(page, tmp_path, "space_region_similarity.png")


def test_clicking_an_example_describes_its_true_boxes(page, tmp_path):
    from playwright.sync_api import expect

    page.get_by_role("tab", name="Describe regions").click()
    examples = page.locator("#describe_examples")
    expect(examples).to_be_visible(timeout=15000)
    examples.locator("button, tr, .gallery-item").first.click()
    result = page.locator("#describe_json")
    expect(page.locator("#describe_img img")).to_have_count(3, timeout=30000)  # the image + two box masks
    expect(result).to_contain_text('"caption"')
    screenshot(page, tmp_path, "space_example.png")


def test_ask_says_the_checkpoint_was_not_trained_for_it(page, tmp_path):
    from playwright.sync_api import expect

    page.get_by_role("tab", name="Ask").click()
    expect(page.locator("#ask_untrained")).to_contain_text("not trained to answer questions", timeout=15000)
    expect(page.locator("#ask_btn")).to_be_disabled()
    screenshot(page, tmp_path, "space_ask_untrained.png")
