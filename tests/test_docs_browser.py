"""/docs in a real browser (Debian's chromium, driven by Playwright): authorize with a real
keypair through the OAuth2 client-credentials dialog, then "Try it out" on a prediction."""

import json
import shutil

import pytest

from local.helpers import demo_image

pytestmark = pytest.mark.slow
CHROMIUM = shutil.which("chromium")
if CHROMIUM is None:
    pytest.skip("Debian's chromium is not installed (./test.sh installs it as root)", allow_module_level=True)
playwright = pytest.importorskip("playwright.sync_api")
FLAGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


@pytest.fixture(scope="module")
def browser():
    with playwright.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=FLAGS)
        yield browser
        browser.close()


def test_authorize_and_try_a_prediction(browser, running_stack, tmp_path):
    assert running_stack.keys("-g", str(tmp_path / "k.json")).returncode == 0
    pair = json.loads((tmp_path / "k.json").read_text())
    demo_image("shapes", "square", 31).save(tmp_path / "square.png")

    page = browser.new_page(viewport={"width": 1300, "height": 1400})
    offline = []
    page.on("request", lambda r: offline.append(r.url) if not r.url.startswith(running_stack.gateway) else None)
    page.goto(f"{running_stack.gateway}/docs")
    page.wait_for_selector(".information-container", timeout=20000)
    page.select_option(".topbar select", label="shapes")
    page.wait_for_selector("text=Thalamus model shapes")

    page.click("button.authorize")
    oauth = page.locator(".auth-container", has_text="clientCredentials")
    oauth.locator("#client_id").fill(pair["public_key"])
    oauth.locator("#client_secret").fill(pair["secret_key"])
    oauth.locator("button.authorize").click()
    page.wait_for_selector(".auth-container button:has-text('Logout')", timeout=15000)
    page.locator(".dialog-ux button.btn-done").first.click()

    operation = page.locator(".opblock-post", has_text="/predict.json")
    operation.locator(".opblock-summary").click()
    operation.locator("button.try-out__btn").click()
    operation.locator("button:has-text('Add string item')").click()
    operation.locator("input[type=file]").first.set_input_files(str(tmp_path / "square.png"))
    operation.locator("button.execute").click()
    status = operation.locator(".live-responses-table .response .response-col_status").first
    status.wait_for(timeout=20000)
    body = json.loads(operation.locator(".live-responses-table .microlight").first.inner_text())
    operation.locator(".live-responses-table").scroll_into_view_if_needed()
    page.screenshot(path=str(tmp_path / "docs.png"))

    assert status.inner_text().strip() == "200"
    assert body["prediction"] == "square"
    assert offline == []  # no CDN: every file came from the gateway
    print(f"screenshot: {tmp_path / 'docs.png'}")
