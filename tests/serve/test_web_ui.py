"""The web chat page of `selfhost serve` in a real headless Chromium (Debian's, driven by Playwright).

The page's behaviour (stop, regenerate, edit, switch, delete, escaping, errors, the API key, cross-site
calls) runs on the real server in this process over the fake engine (tests/fakes/inprocess.py,
tests/fakes/engine.py): replies are scripted, so what the page shows is known exactly. One test keeps
the whole loop real: `selfhost serve --open` with SmolLM2 in llama.cpp behind uvicorn in a subprocess,
a REPL conversation in the SQLite history that the page continues."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import httpx
import pytest

from tests.conftest import checkout_env, selfhost_command
from tests.fakes.engine import FakeModel
from tests.fakes.inprocess import InProcessServer
from tests.fakes.servehelp import Server

pytestmark = pytest.mark.slow

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
KEY = "page-key-456"
ONE_SENTENCE = "Answer in one short sentence."
PARIS = "The capital of France is Paris."
STORY = "Once upon a time" + " the dragon flew over the knight." * 200  # more than the 400 tokens asked
XSS = "<img src=x onerror=alert(1)> [a](javascript:alert(2))"
REPLY_PAYLOADS = "\n\n".join(
    [
        "Here is **bold** text.",
        "<img src=x onerror=alert(3)>",
        "<script>alert(4)</script>",
        '<a href="javascript:alert(5)" id="bad-link">click me</a>',
        "[md link](javascript:alert(6))",
        "<svg onload=alert(7)></svg>",
        '<iframe src="javascript:alert(8)"></iframe>',
        "```python\nprint('<b>not bold</b>')\n```",
    ]
)
DANGEROUS = "script, iframe, object, embed, [onerror], [onload], [onclick], a[href^='javascript']"


@pytest.fixture(scope="module")
def playwright_browser():
    sync_api = pytest.importorskip("playwright.sync_api")
    if not Path(CHROMIUM).exists():
        pytest.skip("Debian's chromium is not installed (.ci/setup installs it)")
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        yield browser
        browser.close()


@pytest.fixture
def server(tiny_gguf: Path, fake_model: FakeModel, isolated_home: Path, monkeypatch: pytest.MonkeyPatch):
    """`selfhost serve` in this process over the fake engine (model `tiny`); its history is the test's."""
    srv = InProcessServer(monkeypatch, [tiny_gguf], parallel=2, ctx=1024, threads=2)
    srv.home = isolated_home
    yield srv
    srv.stop()


@pytest.fixture
def keyed(tiny_gguf: Path, fake_model: FakeModel, monkeypatch: pytest.MonkeyPatch):
    """A second in-process server, with an API key and one CORS origin."""
    srv = InProcessServer(
        monkeypatch, [tiny_gguf], api_key=KEY, parallel=1, ctx=512, cors_origins=["http://allowed.example"]
    )
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def shots(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Where the run's screenshots go (kept by pytest's tmp dir; printed so a person can look)."""
    folder = tmp_path_factory.mktemp("screenshots")
    print(f"screenshots: {folder}")
    return folder


def open_page(browser, url: str, **context_options):
    context_options.setdefault("viewport", {"width": 1100, "height": 760})
    context = browser.new_context(**context_options)
    page = context.new_page()
    page.errors = []
    page.on("pageerror", lambda exc: page.errors.append(str(exc)))
    page.alerts = []  # what an XSS payload would open (and what it waits on)
    page.on("dialog", lambda dialog: (page.alerts.append(dialog.message), dialog.dismiss()))
    page.goto(url)
    return page


def ready(page) -> None:
    page.wait_for_selector("body.ready", timeout=20_000)


def set_settings(page, *, system: str = ONE_SENTENCE, temperature: str = "0", max_tokens: str = "24") -> None:
    if page.locator("#settings").is_hidden():
        page.click("#settings-toggle")
    page.fill("#system", system)
    page.fill("#temperature", temperature)
    page.fill("#max_tokens", max_tokens)
    page.click("#settings-toggle")


def send(page, text: str, wait: bool = True) -> None:
    before = page.locator("#messages .msg.assistant .stats:not(:empty)").count()
    page.fill("#input", text)
    page.press("#input", "Enter")
    if wait:
        page.locator("#messages .msg.assistant .stats:not(:empty)").nth(before).wait_for(timeout=120_000)
        page.locator("#send").wait_for(state="visible")


def replies(page) -> list[str]:
    return [text.strip() for text in page.locator("#messages .msg.assistant .content").all_inner_texts()]


def history(home: Path, *args: str) -> object:
    """`selfhost history ARGS --json` on `home` (the CLI in this process: the REPL's view of the log)."""
    from typer.testing import CliRunner

    from selfhost.cli.app import app

    result = CliRunner().invoke(app, ["history", *args, "--json"], env={"SELFHOST_HOME": str(home)})
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


def current_id(page) -> int:
    return int(page.locator("#conversations li.active").get_attribute("data-id"))


def wait_done(page) -> None:
    page.locator("#messages .msg.assistant .stats:not(:empty)").last.wait_for(timeout=30_000)
    page.locator("#send").wait_for(state="visible")


# ------------------------------------------------------- the page, over the fake engine
def test_page_is_served_offline_with_its_assets(server: InProcessServer) -> None:
    page = httpx.get(f"{server.url}/", timeout=10)
    assert page.status_code == 200 and "text/html" in page.headers["content-type"]
    csp = page.headers["content-security-policy"]
    assert "script-src 'self'" in csp and "frame-ancestors 'none'" in csp
    assets = re.findall(r'(?:src|href)="(/ui/static/[^"]+)"', page.text)
    app_js = httpx.get(f"{server.url}/ui/static/app.js", timeout=10).text
    assets += ["/ui/static/" + p.removeprefix("./") for p in re.findall(r'from "(\./[^"]+)"', app_js)]
    assert len(assets) > 10
    for asset in assets:
        assert httpx.get(f"{server.url}{asset}", timeout=10).status_code == 200, asset
    # nothing is fetched from elsewhere: no absolute URL in what the page loads
    for name in ("index.html", "app.js", "style.css"):
        text = httpx.get(f"{server.url}/ui/static/{name}" if name != "index.html" else f"{server.url}/").text
        assert not re.search(r"""(src|href|from)\s*=?\s*["']https?://""", text), name


def test_chat_stop_regenerate_switch_history_delete(
    server: InProcessServer, fake_model: FakeModel, playwright_browser, shots: Path
) -> None:
    fake_model.enqueue(PARIS, "Paris, on the Seine.")
    page = open_page(playwright_browser, f"{server.url}/")
    ready(page)
    assert page.locator("#model option").first.inner_text().startswith("tiny")
    set_settings(page)
    send(page, "What is the capital of France?")
    assert replies(page) == [PARIS]
    asked = fake_model.prompts[-1]  # the model read the system prompt and the question
    assert ONE_SENTENCE in asked and "What is the capital of France?" in asked
    stats = page.locator("#messages .msg.assistant .stats").last.inner_text()
    assert re.search(r"7 tokens · [\d.]+ tok/s · first token [\d.]+ s · prompt \d+ tokens", stats), stats
    paris = current_id(page)

    # the conversation is the REPL's history: `selfhost history list` shows it, with the system prompt
    listed = {c["id"]: c for c in history(server.home, "list")}
    assert listed[paris]["title"] == "What is the capital of France?" and listed[paris]["n_messages"] == 2
    shown = history(server.home, "show", str(paris))
    assert shown["system"] == ONE_SENTENCE and shown["messages"][1]["content"] == PARIS

    # regenerate: the reply is replaced, not added, and asked for the same question again
    page.locator(".msg.assistant .action.regenerate").click()
    page.locator("#messages .msg.assistant .content", has_text="Seine").wait_for(timeout=30_000)
    wait_done(page)
    assert replies(page) == ["Paris, on the Seine."]
    assert fake_model.prompts[-1] == fake_model.prompts[-2]
    regenerated = history(server.home, "show", str(paris))["messages"]
    assert [m["content"] for m in regenerated] == ["What is the capital of France?", "Paris, on the Seine."]

    # stop a long reply mid-stream with Esc: the part said is kept as an interrupted reply
    page.click("#new-chat")
    set_settings(page, system="", temperature="0.8", max_tokens="400")
    fake_model.step_seconds = 0.05  # 400 tokens would take 20 s
    fake_model.enqueue(STORY)
    send(page, "Write a very long story about a dragon and a knight.", wait=False)
    page.locator(".msg.assistant.streaming .content:not(:empty)").wait_for(timeout=30_000)
    page.keyboard.press("Escape")
    page.locator("#send").wait_for(state="visible", timeout=30_000)
    page.locator(".msg.assistant .stats", has_text="stopped").wait_for(timeout=30_000)
    fake_model.step_seconds = 0.0
    story = current_id(page)
    stopped = history(server.home, "show", str(story))["messages"][-1]
    assert stopped["finish_reason"] == "interrupted" and 0 < stopped["tokens"] < 400
    assert stopped["content"].startswith("Once") and STORY.startswith(stopped["content"])  # what was said
    assert replies(page)[-1] == stopped["content"].strip()

    # edit-and-resend the last message: it replaces the message and its reply
    fake_model.enqueue("Hello!")
    page.locator(".msg.user .action.edit").click()
    page.fill(".edit-box", "Say hello.")
    page.locator(".msg.user .action.send").click()
    page.locator("#messages .msg.assistant .content", has_text="Hello!").wait_for(timeout=30_000)
    wait_done(page)
    edited = history(server.home, "show", str(story))["messages"]
    assert [(m["role"], m["content"]) for m in edited] == [("user", "Say hello."), ("assistant", "Hello!")]
    assert replies(page) == ["Hello!"]

    # switch back to the first conversation from the sidebar
    page.locator(f'#conversations li[data-id="{paris}"] button').click()
    page.locator("#conv-title", has_text="What is the capital of France?").wait_for()
    assert replies(page) == ["Paris, on the Seine."]
    assert page.input_value("#system") == ONE_SENTENCE
    page.screenshot(path=str(shots / "chat-light.png"))
    page.emulate_media(color_scheme="dark")
    page.screenshot(path=str(shots / "chat-dark.png"))
    page.emulate_media(color_scheme="light")

    # delete it from the page (after a confirmation): gone from `selfhost history list`
    page.click("#delete")
    assert "cannot be undone" in page.locator("#ask-text").inner_text()
    page.click("#ask-ok")
    page.locator(f'#conversations li[data-id="{paris}"]').wait_for(state="detached")
    assert {c["id"] for c in history(server.home, "list")} == {story}
    assert page.errors == []
    page.context.close()


def test_xss_in_a_reply_and_a_title_stays_inert(
    server: InProcessServer, fake_model: FakeModel, playwright_browser
) -> None:
    from selfhost.chat.history import HistoryStore
    from selfhost.chat.messages import Conversation, Message

    store = HistoryStore(server.home / "history.db")
    hostile = store.create(
        Conversation(
            title=XSS,
            model="evil",
            messages=[Message(role="user", content=XSS), Message(role="assistant", content=REPLY_PAYLOADS)],
        )
    )
    store.close()
    page = open_page(playwright_browser, f"{server.url}/")
    ready(page)
    item = page.locator(f'#conversations li[data-id="{hostile}"] .title')
    assert item.inner_text() == XSS  # the title is text, not markup
    item.click()
    page.locator(".msg.assistant .content strong", has_text="bold").wait_for()
    assert page.locator("#conv-title").inner_text() == XSS
    for link in page.locator(".msg .content a").all():
        link.click()  # would run a javascript: URL if one were left
    content = page.locator("#messages")
    assert content.locator(DANGEROUS).evaluate_all("l => l.map(e => e.outerHTML)") == []
    assert content.locator(".msg.user img").count() == 0  # the user's text is never HTML
    assert page.locator("pre code").inner_text().startswith("print('<b>not bold</b>')")

    # a streamed reply: the model says the payloads itself, token by token
    fake_model.enqueue(XSS, REPLY_PAYLOADS)
    page.click("#new-chat")
    send(page, "Say anything.")
    reply = page.locator(".msg.assistant .content").last
    assert reply.locator("img").count() == 1 and reply.locator("img[onerror]").count() == 0
    assert reply.locator("a").count() == 1 and reply.locator("a[href^='javascript']").count() == 0
    send(page, "Say more.")
    reply = page.locator(".msg.assistant .content").last
    reply.locator("strong", has_text="bold").wait_for()
    for link in reply.locator("a").all():
        link.click()
    assert content.locator(DANGEROUS).evaluate_all("l => l.map(e => e.outerHTML)") == []
    assert reply.locator("pre code").inner_text().startswith("print('<b>not bold</b>')")
    page.wait_for_timeout(300)
    assert page.alerts == [] and page.errors == []
    page.context.close()


def test_screenshots_light_dark_and_phone(server: InProcessServer, playwright_browser, shots: Path) -> None:
    from selfhost.chat.history import HistoryStore
    from selfhost.chat.messages import Conversation, Message

    store = HistoryStore(server.home / "history.db")
    demo = Conversation(
        title="Sum a list in Python",
        model="SmolLM2-135M-Instruct.Q4_1",
        messages=[
            Message(role="user", content="How do I sum a list in Python?"),
            Message(
                role="assistant",
                content="<think>The user wants the sum of a list: sum() does it.</think>"
                "Use the built-in `sum`:\n\n```python\nnumbers = [1, 2, 3]\n"
                "print(sum(numbers))  # 6\n```",
                tokens=31,
            ),
        ],
    )
    shown = store.create(demo)
    store.close()
    backgrounds = {}
    for scheme in ("light", "dark"):
        page = open_page(playwright_browser, f"{server.url}/#c={shown}", color_scheme=scheme)
        ready(page)
        page.locator(".msg.assistant pre .copy").wait_for()
        thinking = page.locator(".msg.assistant details.thinking")
        assert thinking.is_visible() and thinking.get_attribute("open") is None  # collapsed
        assert "sum() does it" not in page.locator(".msg.assistant .content").inner_text()
        page.screenshot(path=str(shots / f"page-{scheme}.png"))
        backgrounds[scheme] = page.evaluate("() => getComputedStyle(document.body).backgroundColor")
        page.context.close()
    assert backgrounds == {"light": "rgb(255, 255, 255)", "dark": "rgb(13, 17, 23)"}

    # a phone-sized window: the history slides in over the chat
    page = open_page(playwright_browser, f"{server.url}/#c={shown}", viewport={"width": 390, "height": 760})
    ready(page)
    assert page.locator("#sidebar").bounding_box()["x"] < 0
    composer = page.locator("#composer").bounding_box()
    assert composer["x"] >= 0 and composer["x"] + composer["width"] <= 390
    page.screenshot(path=str(shots / "page-phone.png"))
    page.click("#toggle-sidebar")
    page.wait_for_timeout(300)
    assert page.locator("#sidebar").bounding_box()["x"] == 0
    page.context.close()
    for name in ("page-light.png", "page-dark.png", "page-phone.png"):
        assert (shots / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_context_full_and_a_model_that_cannot_load_are_readable_errors(
    server: InProcessServer, fake_model: FakeModel, playwright_browser
) -> None:
    page = open_page(playwright_browser, f"{server.url}/")
    ready(page)
    # a model that cannot be loaded (no such model): one line, the message given back
    page.locator("#model").evaluate("s => s.append(new Option('other-model (not loaded)', 'other-model'))")
    page.select_option("#model", "other-model")
    page.fill("#input", "Hello?")
    page.press("#input", "Enter")
    page.locator("#error-text", has_text="other-model").wait_for(timeout=30_000)
    assert "was not found" in page.locator("#error-text").inner_text()  # the manager's one line
    assert page.input_value("#input") == "Hello?" and page.locator(".msg").count() == 0
    page.select_option("#model", index=0)
    page.fill("#input", "word " * 1500)
    page.press("#input", "Enter")
    page.locator("#error-text", has_text="Context full").wait_for(timeout=30_000)
    assert "does not fit" in page.locator("#error-text").inner_text()
    assert page.input_value("#input").startswith("word word")  # given back to edit
    assert fake_model.prompts == []  # neither reached the model
    page.context.close()


# ------------------------------------------------------------- safety, auth
def test_api_key_asked_once_sent_as_bearer_and_server_down(
    keyed: InProcessServer, fake_model: FakeModel, playwright_browser
) -> None:
    page = open_page(playwright_browser, f"{keyed.url}/")
    seen: list[tuple[str, str | None]] = []
    page.on("request", lambda r: seen.append((r.url, r.headers.get("authorization"))))
    page.locator("#ask[open]").wait_for()
    assert "API key" in page.locator("#ask-text").inner_text()
    page.fill("#ask-input", "wrong-key")
    page.click("#ask-ok")
    page.locator("#ask-error", has_text="refused").wait_for()
    page.fill("#ask-input", KEY)
    page.click("#ask-ok")
    ready(page)
    assert page.locator("#model option").count() >= 1
    fake_model.enqueue("Hi there.")
    set_settings(page, max_tokens="8")
    send(page, "Hi")
    assert replies(page) == ["Hi there."]
    page.reload()  # asked once: the key is remembered
    ready(page)
    assert page.locator("#ask[open]").count() == 0
    api_calls = [(url, auth) for url, auth in seen if "/ui/api/" in url or "/v1/" in url]
    assert api_calls and all(KEY not in url for url, _ in seen)
    assert (f"{keyed.url}/ui/api/chat", f"Bearer {KEY}") in api_calls

    # the server goes away: the page says so in one line
    keyed.stop()
    send(page, "Are you there?", wait=False)
    page.locator("#error-text", has_text="Cannot reach the selfhost server").wait_for(timeout=30_000)
    page.context.close()


def test_cross_site_calls_refused_cors_closed_by_default(
    server: InProcessServer, keyed: InProcessServer, fake_model: FakeModel
) -> None:
    before = len(history(server.home, "list"))
    body = json.dumps({"action": "send", "content": "hi", "sampling": {"max_tokens": 2}})
    headers = {"Content-Type": "application/json", "Origin": "http://evil.example"}
    for srv, auth in ((server, {}), (keyed, {"Authorization": f"Bearer {KEY}"})):
        refused = httpx.post(f"{srv.url}/ui/api/chat", content=body, headers={**headers, **auth}, timeout=30)
        assert refused.status_code == 403 and refused.json()["error"]["code"] == "cross_site"
        gone = httpx.delete(f"{srv.url}/ui/api/conversations/1", headers={**headers, **auth}, timeout=30)
        assert gone.status_code == 403
        completion = httpx.post(f"{srv.url}/v1/chat/completions", content="{}", headers={**headers, **auth})
        assert completion.status_code == 403
    assert fake_model.prompts == []  # nothing refused reached the model
    # a preflight from another site gets no CORS grant by default
    preflight = httpx.options(
        f"{server.url}/ui/api/chat",
        headers={"Origin": "http://evil.example", "Access-Control-Request-Method": "POST"},
    )
    assert "access-control-allow-origin" not in preflight.headers
    assert len(history(server.home, "list")) == before
    # --cors-origin opens it to that origin only
    allowed = {"Origin": "http://allowed.example", "Authorization": f"Bearer {KEY}"}
    ok = httpx.get(f"{keyed.url}/ui/api/conversations", headers=allowed, timeout=30)
    assert ok.status_code == 200 and ok.headers["access-control-allow-origin"] == "http://allowed.example"
    fake_model.enqueue("Hello from the allowed origin.")
    sent = httpx.post(
        f"{keyed.url}/ui/api/chat",
        content=body,
        headers={**allowed, "Content-Type": "application/json"},
        timeout=30,
    )
    assert sent.status_code == 200 and '"type": "done"' in sent.text
    assert "Hello" in sent.text and len(fake_model.prompts) == 1
    # the key is needed for the page's API as for /v1
    assert httpx.get(f"{keyed.url}/ui/api/conversations", timeout=30).status_code == 401


# ------------------------------------------------- end to end: SmolLM2 in llama.cpp, the CLI's serve
@pytest.fixture(scope="module")
def real_server(smollm2_gguf: Path, tmp_path_factory: pytest.TempPathFactory):
    """`selfhost serve --open` in a subprocess with SmolLM2 (the "browser" notes the URL it is given)."""
    root = tmp_path_factory.mktemp("web")
    browser = root / "browser.sh"
    browser.write_text(f'#!/bin/sh\necho "$1" > {root}/opened\n')
    browser.chmod(0o755)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("BROWSER", str(browser))  # what Python's webbrowser module runs
        flags = ["--parallel", "1", "--ctx", "1024", "--threads", "2", "--open"]
        with Server(smollm2_gguf, root / "home", *flags) as srv:
            srv.opened = root / "opened"
            yield srv


def test_repl_conversation_continues_in_the_page(
    real_server: Server, playwright_browser, smollm2_gguf: Path
) -> None:
    server = real_server
    assert f"chat page: {server.url}/" in server.output(), server.output()
    assert server.opened.read_text().strip() == f"{server.url}/"  # --open opened the page
    one_shot = subprocess.run(
        selfhost_command(
            "chat",
            str(smollm2_gguf),
            "-p",
            "Name a colour.",
            "--max-tokens",
            "12",
            "--temperature",
            "0",
            "--threads",
            "2",
            "--ctx",
            "512",
        ),
        env=checkout_env(SELFHOST_HOME=str(server.home)),
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert one_shot.returncode == 0, one_shot.stderr
    repl = max(c["id"] for c in history(server.home, "list"))
    page = open_page(playwright_browser, f"{server.url}/")
    ready(page)
    assert page.locator("#model option").first.inner_text().startswith("SmolLM2")
    page.locator(f'#conversations li[data-id="{repl}"] button').click()
    page.locator("#conv-title", has_text="Name a colour.").wait_for()
    assert page.locator(".msg.user .content").all_inner_texts() == ["Name a colour."]
    assert replies(page)[0] == one_shot.stdout.strip()

    # continue it in the page: SmolLM2 answers, and the same conversation in the history grows by one turn
    set_settings(page, system="", max_tokens="12")
    send(page, "Name another one.")
    stats = page.locator("#messages .msg.assistant .stats").last.inner_text()
    assert re.search(r"\d+ tokens · [\d.]+ tok/s · first token [\d.]+ s · prompt \d+ tokens", stats), stats
    messages = history(server.home, "show", str(repl))["messages"]
    assert [m["content"] for m in messages[:3]] == [
        "Name a colour.",
        messages[1]["content"],
        "Name another one.",
    ]
    assert len(messages) == 4 and current_id(page) == repl
    assert messages[3]["content"].strip() and replies(page)[-1] == messages[3]["content"].strip()

    # search finds it by its text; export gives the REPL's Markdown
    page.fill("#search", "another one")
    page.locator("#conversations li").first.wait_for()
    page.wait_for_timeout(400)
    found = page.locator("#conversations li").evaluate_all("l => l.map(e => Number(e.dataset.id))")
    assert found == [repl]
    with page.expect_download() as download:
        page.click("#export")
    text = Path(download.value.path()).read_text()
    assert text.startswith("# Name a colour.") and "## User\n\nName another one." in text

    # rename from the page: the REPL's history has the new title
    page.click("#rename")
    page.fill("#ask-input", "Colours <b>and</b> more")
    page.click("#ask-ok")
    page.locator("#conv-title", has_text="Colours <b>and</b> more").wait_for()
    assert {c["id"]: c["title"] for c in history(server.home, "list")}[repl] == "Colours <b>and</b> more"
    missing = httpx.patch(f"{server.url}/ui/api/conversations/999999", json={"title": "x"}, timeout=30)
    assert missing.status_code == 404 and "no conversation 999999" in missing.json()["error"]["message"]
    assert page.errors == []
    page.context.close()
