"""The web chat in a real browser (system Chromium under Playwright).

Each test starts its own app processes on 127.0.0.1 (killed at the end) and bounds
every wait with Playwright's timeouts.
"""

from __future__ import annotations

import pathlib
import signal
import time
import uuid

import pytest

from .conftest import ROOT, postgres_or_skip

pytestmark = pytest.mark.slow

JS_IDS = "() => [...document.querySelectorAll('#messages .msg')].map(e => +e.dataset.id)"
JS_TEXTS = "() => [...document.querySelectorAll('#messages .msg .text')].map(e => e.textContent)"


def room() -> str:
    return "room-" + uuid.uuid4().hex[:8]


def wait_count(page, count: int) -> None:
    page.wait_for_function(
        f"document.querySelectorAll('#messages .msg').length >= {count}", timeout=30_000
    )


def send_many(page, prefix: str, count: int, delay_ms: int = 0) -> None:
    """Start sending in the page (returns at once; the page keeps sending)."""
    page.evaluate(
        """([prefix, count, delay]) => { window.sending = (async () => {
            for (let i = 1; i <= count; i++) {
                await window.chatSend(prefix + i);
                if (delay) await new Promise(ok => setTimeout(ok, delay));
            }
        })(); }""",
        [prefix, count, delay_ms],
    )


def test_two_pages_fifty_each_concurrently_show_one_to_hundred(start_app, new_page):
    app = start_app()
    r = room()
    a = new_page(f"{app.url}/?room={r}&name=al")
    b = new_page(f"{app.url}/?room={r}&name=bo")
    send_many(a, "a", 50)
    send_many(b, "b", 50)
    for page in (a, b):
        wait_count(page, 100)
    time.sleep(0.3)  # anything extra would show now
    texts = {}
    for page in (a, b):
        assert page.evaluate(JS_IDS) == list(range(1, 101))
        texts[page] = page.evaluate(JS_TEXTS)
        assert sorted(texts[page]) == sorted(
            [f"a{i}" for i in range(1, 51)] + [f"b{i}" for i in range(1, 51)]
        )
    assert texts[a] == texts[b]
    # Each page's own messages are in the order it sent them.
    for prefix in "ab":
        mine = [t for t in texts[a] if t[0] == prefix]
        assert mine == [f"{prefix}{i}" for i in range(1, 51)]


def test_reload_shows_last_fifty_then_new_then_load_earlier(start_app, new_page):
    app = start_app()
    r = room()
    a = new_page(f"{app.url}/?room={r}&name=al")
    send_many(a, "m", 120)
    wait_count(a, 120)
    a.reload()
    a.wait_for_function("document.body.dataset.state === 'live'")
    wait_count(a, 50)
    time.sleep(0.3)
    assert a.evaluate(JS_IDS) == list(range(71, 121))
    send_many(a, "n", 3)
    wait_count(a, 53)
    assert a.evaluate(JS_IDS) == list(range(71, 124))
    a.click("#earlier")
    wait_count(a, 103)
    assert a.evaluate(JS_IDS) == list(range(21, 124))
    a.click("#earlier")
    wait_count(a, 123)
    assert a.evaluate(JS_IDS) == list(range(1, 124))
    assert a.locator("#earlier").is_hidden()
    assert a.evaluate(JS_TEXTS)[:3] == ["m1", "m2", "m3"]


def test_two_processes_on_postgres_survive_a_restart(start_app, new_page):
    dsn = postgres_or_skip()
    app1 = start_app("--dsn", dsn)
    app2 = start_app("--dsn", dsn)
    r = room()
    a = new_page(f"{app1.url}/?room={r}&name=al")
    b = new_page(f"{app2.url}/?room={r}&name=bo")
    send_many(a, "a", 5)
    wait_count(b, 5)
    wait_count(a, 5)
    send_many(b, "b", 60, delay_ms=40)
    wait_count(a, 15)
    app1.kill()  # the process behind page a dies while b keeps sending
    at_kill = len(b.evaluate(JS_IDS))
    a.wait_for_function("document.body.dataset.state === 'reconnecting'")
    time.sleep(0.5)
    assert len(b.evaluate(JS_IDS)) > at_kill  # messages came while a's server was gone
    app1.start()  # same port
    for page in (a, b):
        wait_count(page, 65)
    a.wait_for_function("document.body.dataset.state === 'live'")
    time.sleep(0.5)
    for page in (a, b):
        assert page.evaluate(JS_IDS) == list(range(1, 66))
    assert a.evaluate(JS_TEXTS) == b.evaluate(JS_TEXTS)
    assert [t for t in a.evaluate(JS_TEXTS) if t[0] == "b"] == [f"b{i}" for i in range(1, 61)]


def test_a_page_that_saw_nothing_yet_resumes_where_it_started(start_app, new_page):
    """Reconnecting before any message came, the page must not jump to a newer tail."""
    dsn = postgres_or_skip()
    app1 = start_app("--dsn", dsn)
    app2 = start_app("--dsn", dsn)
    r = room()
    a = new_page(f"{app1.url}/?room={r}&name=al")  # an empty room: nothing shown
    b = new_page(f"{app2.url}/?room={r}&name=bo")
    app1.kill()
    a.wait_for_function("document.body.dataset.state === 'reconnecting'")
    send_many(b, "b", 60)  # more than the page's last=50 while it is away
    wait_count(b, 60)
    app1.start()
    a.wait_for_function("document.body.dataset.state === 'live'")
    wait_count(a, 50)
    time.sleep(0.5)
    assert a.evaluate(JS_IDS) == list(range(1, 61))


def test_store_unreachable_shows_reconnecting_then_live(start_app, new_page, postgres_proxy):
    """The app's Postgres goes away and comes back: the page says so, and loses nothing."""
    proxied_dsn, proxy = postgres_proxy
    app1 = start_app("--dsn", proxied_dsn)
    app2 = start_app("--dsn", postgres_or_skip())
    r = room()
    a = new_page(f"{app1.url}/?room={r}&name=al")
    b = new_page(f"{app2.url}/?room={r}&name=bo")
    send_many(b, "b", 3)
    wait_count(a, 3)
    proxy.cut()
    a.wait_for_function(
        "document.getElementById('status').textContent === 'store unreachable, reconnecting…'",
        timeout=30_000,
    )
    assert a.evaluate("() => document.body.dataset.state") == "reconnecting"
    send_many(b, "c", 10)
    wait_count(b, 13)
    proxy.restore()
    a.wait_for_function("document.getElementById('status').textContent === 'live'", timeout=30_000)
    wait_count(a, 13)
    time.sleep(0.5)
    assert a.evaluate(JS_IDS) == list(range(1, 14))
    assert a.evaluate(JS_TEXTS) == b.evaluate(JS_TEXTS)


def test_typing_indicator_appears_and_goes_after_its_ttl(start_app, new_page):
    app = start_app("--typing-ttl", "1.5")
    r = room()
    a = new_page(f"{app.url}/?room={r}&name=al")
    b = new_page(f"{app.url}/?room={r}&name=bo")
    a.type("#text", "hel")
    b.wait_for_function(
        "document.getElementById('typing').textContent.includes('al is typing')", timeout=5000
    )
    assert a.locator("#typing").text_content() == ""  # not shown to yourself
    started = time.monotonic()
    b.wait_for_function("document.getElementById('typing').textContent === ''", timeout=5000)
    assert time.monotonic() - started < 3.0


def test_markup_in_messages_is_shown_as_text_and_never_runs(start_app, new_page):
    app = start_app()
    r = room()
    a = new_page(f"{app.url}/?room={r}&name=al")
    b = new_page(f"{app.url}/?room={r}&name=<b>bo</b>")
    evil = [
        '<img src=x onerror="window.pwned=1">',
        "<script>window.pwned=2</script>",
        '"><svg onload="window.pwned=3">',
    ]
    for text in evil:
        a.evaluate("(t) => window.chatSend(t)", text)
    wait_count(b, 3)
    b.reload()
    b.wait_for_function("document.body.dataset.state === 'live'")
    wait_count(b, 3)
    for page in (a, b):
        assert page.evaluate(JS_TEXTS) == evil
        assert page.evaluate("() => window.pwned") is None
        assert page.locator("#messages img, #messages script, #messages svg").count() == 0
    assert b.locator("#me").text_content() == "<b>bo</b>"


def test_a_send_whose_answer_was_lost_is_retried_and_shows_once(start_app, new_page):
    """The page retries with the same idempotency key: the server stored the first
    try, answers the retry with the original, and the room has the message once."""
    app = start_app()
    a = new_page(f"{app.url}/?room={room()}&name=al")
    lost: list[str] = []

    def lose_the_first_answer(route) -> None:
        if route.request.method == "POST" and not lost:
            route.fetch()  # the server gets it, stores it and answers; the page never hears
            lost.append(route.request.post_data_json["key"])
            route.abort("connectionreset")
        else:
            route.continue_()

    a.route("**/rooms/*/messages", lose_the_first_answer)
    status = a.evaluate("async () => (await window.chatSend('once')).status")
    assert lost and status == 200  # the retry got the original back, not a new message
    wait_count(a, 1)
    time.sleep(0.5)
    assert a.evaluate(JS_IDS) == [1] and a.evaluate(JS_TEXTS) == ["once"]


def test_a_refused_send_says_why_and_keeps_the_text(start_app, new_page):
    app = start_app()
    a = new_page(f"{app.url}/?room={room()}&name={'n' * 41}")  # over the 40 allowed
    dialogs: list[str] = []
    a.on("dialog", lambda dialog: (dialogs.append(dialog.message), dialog.dismiss()))
    a.fill("#text", "hello")
    a.click("#send button")
    a.wait_for_function("document.getElementById('text').value === 'hello'")
    assert dialogs == ["not sent: name is longer than 40 characters"]
    assert a.locator("#messages .msg").count() == 0


def test_screenshot_of_two_pages_chatting(start_app, browser):
    """Writes docs/web_chat.png: two real pages side by side in one window."""
    app = start_app("--typing-ttl", "30")
    r = "lobby"  # a fresh in-memory app: the name is free
    context = browser.new_context(viewport={"width": 1080, "height": 560})
    try:
        page = context.new_page()
        page.set_default_timeout(20_000)
        style = "flex:1;height:552px;border:0"
        page.set_content(
            "<body style='margin:0;display:flex;gap:8px;background:#ccc'>"
            f"<iframe id=a src='{app.url}/?room={r}&name=al' style='{style}'></iframe>"
            f"<iframe id=b src='{app.url}/?room={r}&name=bo' style='{style}'></iframe>"
            "</body>"
        )
        frames = [page.frame_locator("#a"), page.frame_locator("#b")]
        for frame in frames:
            frame.locator("body[data-state=live]").wait_for()
        lines = [
            (0, "hi bo, the room opens at its last 50 messages"),
            (1, "and a reload picks up right after the last one I saw"),
            (0, "even across a server restart: EventSource sends Last-Event-ID"),
            (1, "<b>markup</b> is shown as text"),
        ]
        for who, text in lines:
            frames[who].locator("#text").fill(text)
            frames[who].locator("#send button").click()
            frames[1 - who].locator(".msg .text", has_text=text).wait_for()
        frames[0].locator("#text").type("typing…")
        frames[1].locator("#typing", has_text="al is typing").wait_for()
        docs = ROOT / "docs"
        docs.mkdir(exist_ok=True)
        path = pathlib.Path(docs / "web_chat.png")
        page.screenshot(path=str(path))
        assert path.stat().st_size > 10_000
    finally:
        context.close()


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_app_exits_cleanly_on_a_signal_with_a_page_open(start_app, new_page, signum):
    app = start_app()
    new_page(f"{app.url}/?room={room()}&name=al")
    started = time.monotonic()
    assert app.stop(timeout=10, signum=signum) == 0
    assert time.monotonic() - started < 5  # the open stream does not hold it up
    log = app.log.read_text()
    assert f"{signal.Signals(signum).name}, stopping" in log and "web_chat: stopped" in log
    assert "Traceback" not in log


def test_a_page_open_across_an_in_memory_restart_is_told_and_splices_nothing(start_app, new_page):
    """Review B, D8 (t_mem_restart): the page showed 1..5; the in-memory app was killed
    and restarted and 8 new messages came. The page's EventSource resumed after id 5
    of the NEW history, showing new5..new7 as if they followed old0..old4. Its resume
    id carries the epoch now: the stream ends, and the page says why."""
    app = start_app()
    r = room()
    a = new_page(f"{app.url}/?room={r}&name=al")
    send_many(a, "old", 5)
    wait_count(a, 5)
    app.kill()
    a.wait_for_function("document.body.dataset.state === 'reconnecting'")
    start_app(port=app.port)
    import httpx  # (a send from elsewhere: the page is not sending)

    for i in range(8):
        httpx.post(f"{app.url}/rooms/{r}/messages", json={"text": f"new{i}"}, timeout=10)
    a.wait_for_function("document.body.dataset.state === 'ended'", timeout=30_000)
    assert a.evaluate("() => document.getElementById('status').textContent") == (
        "history was reset: reload"
    )
    time.sleep(0.5)
    assert a.evaluate(JS_IDS) == [1, 2, 3, 4, 5]
    assert a.evaluate(JS_TEXTS) == [f"old{i}" for i in range(1, 6)]


@pytest.mark.parametrize(
    ("name", "reason"), [("a%2Fb", "must not contain '/'"), ("x" * 300, "the limit is 256")]
)
def test_a_page_for_a_refused_room_says_why(start_app, browser, name, reason):
    """Review B, D7: it said "connecting…" forever."""
    app = start_app()
    context = browser.new_context()
    try:
        page = context.new_page()
        page.goto(f"{app.url}/?room={name}&name=al")
        page.wait_for_function("document.body.dataset.state === 'ended'", timeout=20_000)
        page.wait_for_function(
            "document.getElementById('status').textContent.includes(':')", timeout=20_000
        )
        text = page.evaluate("() => document.getElementById('status').textContent")
        assert text.startswith("stream refused: ") and reason in text, text
    finally:
        context.close()
