"""The web page of `framepack serve` (GET /), driven in a real headless Chromium against the tiny preset.

Debian's chromium (/usr/bin/chromium) driven by Playwright from PyPI; without them every test here is skipped with
the commands that install them (Playwright's own browser download is never used). One server with an API key on a
free loopback port and one browser page run for the module, and the tests follow one session in order: the form, a
job generated and watched to its video, a second one cancelled, the settings reused and retried, a reload, a
delete, and a server restart in the middle of a job. Screenshots of the form, a running job and a finished one go to
$FRAMEPACK_SCREENSHOTS (default: a temporary folder); docs/ keeps copies for the README (made smaller with PIL:
Image.open(path).convert("RGB").quantize(256, dither=Image.Dither.NONE).save(copy, optimize=True)).
"""

import base64
import os
import re
from pathlib import Path

import pytest

from tests.test_server import API_KEY, BUCKET, Server, decode_video, expected_frames, png_bytes, wait_for

try:
    from playwright.sync_api import expect, sync_playwright
except ImportError:  # the skip below names the install
    sync_playwright = None

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run"]
WAIT_MS = 30_000  # the longest any one wait of the page may take

pytestmark = [
    pytest.mark.browser,
    pytest.mark.skipif(sync_playwright is None or not CHROMIUM.exists(), reason=(
        "needs a headless Chromium at /usr/bin/chromium and Playwright: apt-get install -y chromium && "
        "pip install playwright (the version in constraints.txt; never `playwright install`)")),
]

# Small jobs for the 2-core CI machine: 8 frames a second, 2 latent frames a section (8 pixel frames).
QUICK = {"Seconds": "3", "Steps": "12"}
ADVANCED = {"FPS": "8", "Latent window size": "2"}
QUICK_SECTIONS = 3  # round(3 s * 8 fps / (4 * 2))


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    server = Server(tmp_path_factory.mktemp("page") / "state")
    server.start()
    yield server
    if server.process.poll() is None:
        server.kill()  # nothing of its state is needed after the tests


@pytest.fixture(scope="module")
def shots(tmp_path_factory) -> Path:
    folder = os.environ.get("FRAMEPACK_SCREENSHOTS")
    folder = Path(folder) if folder else tmp_path_factory.mktemp("screenshots")
    folder.mkdir(parents=True, exist_ok=True)
    return folder


class Session:
    """The browser page and what it logged: console errors, uncaught errors, every URL it requested."""

    def __init__(self, page):
        self.page, self.errors, self.urls = page, [], []
        self.expected_errors = None  # while set, console errors matching it are expected (the server is down)
        page.on("console", self._console)
        page.on("pageerror", lambda error: self.errors.append(f"uncaught: {error}"))
        page.on("request", lambda request: self.urls.append(request.url))

    def _console(self, message):
        if message.type != "error":
            return
        if self.expected_errors is not None and self.expected_errors.search(message.text):
            return
        self.errors.append(message.text)


@pytest.fixture(scope="module")
def session(server):
    playwright = sync_playwright().start()
    browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS, headless=True)
    try:
        context = browser.new_context(viewport={"width": 1100, "height": 820}, accept_downloads=True)
        page = context.new_page()
        page.set_default_timeout(WAIT_MS)
        yield Session(page)
    finally:
        browser.close()
        playwright.stop()


def url(server) -> str:
    return f"http://127.0.0.1:{server.port}/"


def job_item(page, job_id: str):
    return page.locator(f'#jobs > li[data-id="{job_id}"]')


def newest_job(page, previous: set[str]) -> str:
    """The id of the job the page lists that was not in `previous`."""
    page.wait_for_function("ids => [...document.querySelectorAll('#jobs > li')]"
                           ".some(li => !ids.includes(li.dataset.id))", arg=sorted(previous))
    return next(item.get_attribute("data-id") for item in page.locator("#jobs > li").all()
                if item.get_attribute("data-id") not in previous)


def listed(page) -> set[str]:
    return {item.get_attribute("data-id") for item in page.locator("#jobs > li").all()}


def fill(page, prompt: str, steps: str | None = None) -> None:
    page.get_by_label("Prompt", exact=True).fill(prompt)
    for label, value in {**QUICK, **({"Steps": steps} if steps else {})}.items():
        page.get_by_label(label, exact=True).fill(value)
    advanced = page.locator("#advanced")
    if not advanced.evaluate("details => details.open"):
        page.get_by_text("Advanced", exact=True).click()
    for label, value in ADVANCED.items():
        page.get_by_label(label, exact=True).fill(value)


def submit(page, prompt: str, steps: str) -> str:
    """Fill the form, press Generate: the new job's id."""
    before = listed(page)
    fill(page, prompt, steps=steps)
    page.get_by_role("button", name="Generate", exact=True).click()
    return newest_job(page, before)


def state_of(page, job_id: str):
    return job_item(page, job_id).locator(".job-state")


# --------------------------------------------------------------------------------------------------------------------


def test_the_form_is_built_from_the_schema_and_asks_for_the_key_once(session, server, shots):
    page = session.page
    response = page.goto(url(server))
    policy = response.headers["content-security-policy"]
    assert "script-src 'self'" in policy and "unsafe-inline" not in policy and "default-src 'none'" in policy
    # The server has a key: the page asks for it before any API request.
    expect(page.get_by_role("dialog")).to_be_visible()
    page.get_by_label("API key").fill(API_KEY)
    page.get_by_role("button", name="Connect").click()
    expect(page.get_by_role("dialog")).to_be_hidden()
    for label in ("Prompt", "Start image", "End image", "Seconds", "Seed", "Steps", "Cache", "CFG"):
        expect(page.get_by_label(label, exact=True)).to_be_visible()
    expect(page.get_by_role("button", name="Generate", exact=True)).to_be_enabled()
    expect(page.get_by_label("Seconds", exact=True)).to_have_value("5")
    # Every setting of the API's schema has a field; the rest of them under the Advanced fold.
    with server.client() as client:
        schema = client.get("/openapi.json").json()
    properties = schema["paths"]["/v1/jobs"]["post"]["requestBody"]["content"]["application/json"]["schema"]
    # Keyframes and one-frame runs are API-only (README): the page's list of them names real settings, none of
    # which gets a field; every other setting has exactly one.
    page_script = (Path(__file__).parent.parent / "engine" / "serve" / "page" / "page.js").read_text()
    api_only = re.findall(r'"(\w+)"', re.search(r"const API_ONLY = \[(.*?)\];", page_script, re.S).group(1))
    assert api_only and set(api_only) <= set(properties["properties"]), api_only
    for name in properties["properties"]:
        assert page.locator(f"#field-{name}").count() == (0 if name in api_only else 1), name
    expect(page.get_by_label("FPS", exact=True)).to_be_hidden()
    page.wait_for_timeout(300)  # the first poll of the queue has come back
    page.screenshot(path=shots / "page-form.png")

    seed = page.get_by_label("Seed", exact=True)
    page.get_by_role("button", name="Random seed").click()
    assert re.fullmatch(r"\d+", seed.input_value()) and seed.input_value() != "31337"
    # An image dropped on the start image's zone is taken and shown; Remove takes it back.
    page.evaluate("""(data) => {
        const bytes = Uint8Array.from(atob(data), c => c.charCodeAt(0));
        const transfer = new DataTransfer();
        transfer.items.add(new File([bytes], 'dropped.png', {type: 'image/png'}));
        const zone = document.querySelector('#field-image').closest('.drop');
        zone.dispatchEvent(new DragEvent('drop', {dataTransfer: transfer, bubbles: true, cancelable: true}));
    }""", base64.b64encode(png_bytes()).decode())
    preview = page.get_by_role("img", name="Start image: dropped.png")
    expect(preview).to_be_visible()
    assert page.get_by_label("Start image", exact=True).evaluate("input => input.files[0].name") == "dropped.png"
    page.locator(".field-image").get_by_role("button", name="Remove").click()
    expect(preview).to_be_hidden()
    # Uploads are checked by the server, as for the API, and its message is shown (the browser logs the 422).
    start_image = page.get_by_label("Start image", exact=True)
    start_image.set_input_files(files=[{"name": "notes.png", "mimeType": "image/png", "buffer": b"not an image"}])
    session.expected_errors = re.compile(r"status of 422 \(Unprocessable")
    page.get_by_role("button", name="Generate", exact=True).click()
    expect(page.locator("#form-error")).to_have_text("image is not a readable image: send a PNG, JPEG or WebP file.")
    session.expected_errors = None
    start_image.set_input_files(files=[])
    assert listed(page) == set()
    # The syntax of section prompts is at hand.
    page.get_by_text("Section prompt syntax").click()
    expect(page.get_by_text("[0s: a man waves] [2s: a man jumps]")).to_be_visible()


def test_generate_watch_the_progress_and_preview_and_get_the_video(session, server, shots):
    page = session.page
    before = listed(page)
    fill(page, "a red kite over the sea")
    page.get_by_label("Start image", exact=True).set_input_files(
        files=[{"name": "kite.png", "mimeType": "image/png", "buffer": png_bytes()}])
    expect(page.get_by_role("img", name="Start image: kite.png")).to_be_visible()
    page.get_by_role("button", name="Generate", exact=True).click()
    job_id = newest_job(page, before)
    item = job_item(page, job_id)
    expect(item.get_by_text("a red kite over the sea")).to_be_visible()
    expect(state_of(page, job_id)).to_have_text("running")
    expect(item.get_by_role("progressbar")).to_have_count(2)
    # While it samples: a latent preview, and the bars move on step by step.
    preview = item.get_by_role("img", name=re.compile("^Latent preview"))
    expect(preview).to_be_visible()
    assert preview.get_attribute("src").startswith("data:image/jpeg;base64,")
    handle = item.element_handle()
    page.wait_for_function("li => li.querySelector('.step-bar').value >= 1", arg=handle)
    page.evaluate("() => scrollTo(0, 0)")
    page.screenshot(path=shots / "page-running.png")
    seen = page.evaluate("li => li.querySelector('.section-bar').value", handle)
    page.wait_for_function("([li, seen]) => li.querySelector('.section-bar').value > seen", arg=[handle, seen])

    expect(state_of(page, job_id)).to_have_text("done")
    video = item.locator("video")
    expect(video).to_have_attribute("src", re.compile("^blob:"))
    link = item.get_by_role("link", name="Download video")
    expect(link).to_have_attribute("download", f"framepack_{job_id}.mp4")
    assert link.get_attribute("href") == video.get_attribute("src")
    with page.expect_download() as download:  # the link's file is the video's source
        link.click()
    frames, metadata = decode_video(Path(download.value.path()).read_bytes())
    assert download.value.suggested_filename == f"framepack_{job_id}.mp4"
    with server.client() as client:
        job = client.get(f"/v1/jobs/{job_id}").json()
    assert frames.shape == (expected_frames(QUICK_SECTIONS, 2), *BUCKET, 3)
    assert job["progress"]["frames"] == len(frames) and metadata["prompt"] == "a red kite over the sea"
    assert job["settings"]["steps"] == 12 and job["settings"]["fps"] == 8 and job["inputs"] == ["image"]
    expect(item.get_by_role("progressbar").first).to_have_attribute("value", str(QUICK_SECTIONS))
    expect(page.locator("#counts")).to_have_text("1 done")
    # Chromium decodes it: all of it loaded and a seek lands (its controls then show a frame, not a spinner).
    page.wait_for_function("video => video.readyState === 4 && video.duration > 0", arg=video.element_handle())
    video.evaluate("video => new Promise(done => { video.addEventListener('seeked', done, {once: true}); "
                   "video.currentTime = 0.5; })")
    page.wait_for_timeout(1000)  # the controls' loading spinner fades out
    page.evaluate("() => scrollTo(0, 0)")
    page.screenshot(path=shots / "page-done.png")
    session.done_id = job_id


def test_cancel_a_running_job(session, server):
    page = session.page
    job_id = submit(page, "a slow one", steps="60")
    expect(state_of(page, job_id)).to_have_text("running")
    job_item(page, job_id).get_by_role("button", name="Cancel").click()
    expect(state_of(page, job_id)).to_have_text("cancelled")
    expect(job_item(page, job_id).get_by_role("button", name="Cancel")).to_be_hidden()
    with server.client() as client:
        assert client.get(f"/v1/jobs/{job_id}").json()["state"] == "cancelled"
    session.cancelled_id = job_id


def test_use_these_settings_and_retry(session, server):
    page = session.page
    done = job_item(page, session.done_id)
    page.get_by_label("Prompt", exact=True).fill("")
    page.get_by_label("Seconds", exact=True).fill("1")
    done.get_by_role("button", name="Use these settings").click()
    expect(page.get_by_label("Prompt", exact=True)).to_have_value("a red kite over the sea")
    expect(page.get_by_label("Seconds", exact=True)).to_have_value("3")
    expect(page.get_by_label("FPS", exact=True)).to_have_value("8")
    expect(page.get_by_role("img", name=re.compile("^Start image: image"))).to_be_visible()

    before = listed(page)
    done.get_by_role("button", name="Retry").click()
    job_id = newest_job(page, before)
    expect(state_of(page, job_id)).to_have_text("done")
    with server.client() as client:
        first, again = (client.get(f"/v1/jobs/{name}").json() for name in (session.done_id, job_id))
        assert again["settings"] == first["settings"] and again["output"] == first["output"]
        assert client.get(again["links"]["inputs"]["image"]).content == png_bytes()


def test_reload_shows_the_queue_as_it_was_and_delete_removes_a_job(session, server):
    page = session.page
    states = {job_id: state_of(page, job_id).text_content() for job_id in listed(page)}
    page.reload()
    expect(page.get_by_role("dialog")).to_be_hidden()  # the key is kept for the tab
    expect(page.locator("#jobs > li")).to_have_count(len(states))
    for job_id, state in states.items():
        expect(state_of(page, job_id)).to_have_text(state)
    expect(job_item(page, session.done_id).locator("video")).to_have_attribute("src", re.compile("^blob:"))

    job_item(page, session.cancelled_id).get_by_role("button", name="Delete").click()
    expect(job_item(page, session.cancelled_id)).to_have_count(0)
    with server.client() as client:
        assert client.get(f"/v1/jobs/{session.cancelled_id}").status_code == 404
    page.reload()
    expect(page.locator("#jobs > li")).to_have_count(len(states) - 1)


def test_a_restarted_server_is_followed_again(session, server):
    page = session.page
    job_id = submit(page, "through a restart", steps="8")
    with server.client() as client:  # killed after its first section
        wait_for(client, job_id, ("running",), timeout=30, condition=lambda job: job["progress"]["sections_done"] >= 1)
    # While the server is down the page's requests fail (as the browser logs); they are what this test makes.
    session.expected_errors = re.compile(
        r"net::ERR_(CONNECTION_REFUSED|EMPTY_RESPONSE|CONNECTION_RESET|INCOMPLETE_CHUNKED_ENCODING)")
    server.kill()
    expect(page.get_by_role("status")).to_contain_text("does not answer")
    server.start()
    expect(page.get_by_role("status")).to_contain_text("Connected again")
    session.expected_errors = None
    expect(state_of(page, job_id)).to_have_text("done", timeout=60_000)
    with server.client() as client:
        job = client.get(f"/v1/jobs/{job_id}").json()
    assert job["state"] == "done" and job["stats"]["resumed_from"] >= 1
    expect(job_item(page, job_id).locator("video")).to_have_attribute("src", re.compile("^blob:"))


def test_no_console_errors_and_the_key_never_in_a_url(session):
    assert session.errors == []
    assert session.urls and not [link for link in session.urls if API_KEY in link]
    assert session.page.evaluate("() => Object.keys(localStorage).length") == 0
