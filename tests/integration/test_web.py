"""The chat and swarm pages in a real browser: Debian's chromium driven by Selenium through
chromedriver (no browser download; `.ci/run` installs both), on a 3-node swarm of the bundled demo
model (blocks 0:2, 2:4 and 4:6; node0 serves the pages and the API).

The chat page streams an answer equal to the API's own, with its route; its Stop button ends a
long answer and frees the session on every hop (each node's /metrics says so). The swarm page shows three nodes and
full coverage, a gap within seconds of a node's SIGKILL, and coverage again once a replacement
answers. At a phone's width neither page scrolls sideways. Screenshots of both pages land in build/screenshots/ (README shows copies of them).
"""

from __future__ import annotations

import json
import shutil
import signal
import time
import urllib.request
from pathlib import Path

import pytest
import trio

from node.demo import DEMO_MODEL
from node.swarm import LocalSwarm
from tests.integration.conftest import NODE_ARGS
from tests.integration.test_api import METRICS, api_url, metrics_url, scrape

CHROMIUM, CHROMEDRIVER = shutil.which("chromium"), shutil.which("chromedriver")
SCREENSHOTS = Path(__file__).resolve().parents[2] / "build" / "screenshots"
PROMPT = "Once upon a time"  # the demo model (trained on Python code) answers it to any length

pytestmark = pytest.mark.skipif(not (CHROMIUM and CHROMEDRIVER),
                                reason="needs Debian's chromium and chromium-driver (apt-get install chromium "
                                       "chromium-driver; .ci/run installs them)")


@pytest.fixture
def browser(monkeypatch):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    monkeypatch.setenv("SE_OFFLINE", "true")  # Selenium Manager must never fetch a browser or driver
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1100,1000",
                "--disable-gpu", "--no-first-run", "--disable-extensions"):
        options.add_argument(arg)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    try:
        yield driver
    finally:
        driver.quit()


def wait(driver, condition, timeout: float, message: str):
    from selenium.webdriver.support.ui import WebDriverWait

    return WebDriverWait(driver, timeout, poll_frequency=0.1).until(condition, message)


def text_of(driver, css: str) -> str:
    return driver.find_element("css selector", css).text


def api_answer(url: str, messages: list[dict], max_tokens: int) -> str:
    body = json.dumps({"model": "demo_model", "messages": messages, "max_tokens": max_tokens, "temperature": 0}).encode()
    request = urllib.request.Request(f"{url}/chat/completions", data=body, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=60) as response:
        return json.load(response)["choices"][0]["message"]["content"]


def wait_covered(base: str, timeout: float = 30.0) -> None:
    """Until the swarm view (the swarm page's data) shows every block served: node records take a
    moment to spread through the DHT after the nodes say they listen."""
    deadline = time.monotonic() + timeout
    while True:
        with urllib.request.urlopen(base + "/api/swarm", timeout=30) as response:
            if not json.load(response)["gaps"]:
                return
        assert time.monotonic() < deadline, "the swarm never covered the model"
        time.sleep(0.5)


def send(driver, prompt: str, max_tokens: int, *, keyboard: bool = False) -> None:
    """Type the settings and the prompt; send with the button, or with Enter in the message box."""
    from selenium.webdriver.common.keys import Keys

    for css, value in (("#temperature", "0"), ("#max-tokens", str(max_tokens))):
        field = driver.find_element("css selector", css)
        field.clear()
        field.send_keys(value)
    driver.find_element("css selector", "#prompt").send_keys(prompt + (Keys.ENTER if keyboard else ""))
    if not keyboard:
        driver.find_element("css selector", "#send").click()


UNLABELLED = "return [...document.querySelectorAll('input, textarea, select')].filter(e => !e.labels.length).length"
OVERFLOW = "return document.documentElement.scrollWidth - document.documentElement.clientWidth"


def readable_on_a_phone(driver, base: str) -> None:
    """At a phone's width neither page scrolls sideways, and every field has a label."""
    driver.set_window_size(390, 844)
    try:
        for path, ready in (("/", "#model-name"), ("/swarm", "#summary[data-online]")):
            driver.get(base + path)
            wait(driver, lambda d: d.find_elements("css selector", ready), 20, f"{path} did not load")
            assert driver.execute_script(OVERFLOW) <= 0, path
            assert driver.execute_script(UNLABELLED) == 0, path
    finally:
        driver.set_window_size(1100, 1000)


def chat_answers_and_stops(driver, base: str, api: str, node_metrics: list[str]) -> None:
    """The chat page: one answer streamed to the end, then one stopped mid-answer."""
    driver.get(base + "/")
    wait(driver, lambda d: text_of(d, "#model-name") == "demo_model", 10, "the page did not show the model")
    expected = api_answer(api, [{"role": "user", "content": PROMPT}], 24)
    send(driver, PROMPT, 24)
    wait(driver, lambda d: text_of(d, "#status").startswith("Done"), 60, "the answer did not finish")
    answer = driver.find_element("css selector", "article.message.assistant")
    assert answer.find_element("css selector", ".content").get_attribute("textContent") == expected
    route = answer.find_element("css selector", ".meta").text
    assert route.startswith("Route: this device [0:1]")  # the API's client runs block 0 itself
    assert "[1:2]" in route and "[2:4]" in route and "[4:6]" in route
    driver.save_screenshot(str(SCREENSHOTS / "chat.png"))

    driver.find_element("css selector", "#new-chat").click()
    send(driver, PROMPT, 450, keyboard=True)
    streaming = "article.message.assistant.streaming .content"
    wait(driver, lambda d: len(d.find_element("css selector", streaming).text) > 20, 60, "no streamed text")
    assert all(scrape(url)[("hearth_sessions_open", ())] == 1 for url in node_metrics)  # a session per hop
    api_metrics = base + "/metrics"
    before = scrape(api_metrics)
    driver.find_element("css selector", "#stop").click()
    wait(driver, lambda d: text_of(d, "#status") == "Stopped", 10, "Stop did not stop")
    stopped = driver.find_element("css selector", "article.message.assistant.stopped .content").text
    assert 20 < len(stopped) and driver.find_element("css selector", "#send").is_enabled()
    wait(driver, lambda d: all(scrape(url)[("hearth_sessions_open", ())] == 0 for url in node_metrics), 10,
         "the hops kept their sessions after Stop")
    after = scrape(api_metrics)
    assert after[("hearth_api_generations_active", ())] == 0
    key = ("hearth_api_generations_total", (("outcome", "stopped"),))
    assert after.get(key, 0) == before.get(key, 0) + 1  # ended by the page, before its 450 tokens


def summary(driver) -> tuple[str | None, str | None]:
    element = driver.find_element("css selector", "#summary")
    return element.get_attribute("data-online"), element.get_attribute("data-gaps")


def swarm_page_shows(driver, online: str, gaps: str, timeout: float) -> None:
    wait(driver, lambda d: summary(d) == (online, gaps), timeout,
         f"the swarm page did not show {online} nodes online and {gaps} gaps")


async def test_the_chat_and_swarm_pages_in_a_browser(browser, tmp_path):
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    async with LocalSwarm(DEMO_MODEL, extra_args=NODE_ARGS, work_dir=tmp_path) as swarm:
        head = await swarm.add(0, 2, extra_args=["--api-port", "0"])
        await head.wait_ready(120)  # the others join through it
        middle = await swarm.add(2, 4, extra_args=METRICS)
        tail = await swarm.add(4, 6, extra_args=METRICS)
        for node in swarm.nodes:
            await node.wait_ready(120)
        api = await api_url(head)
        base = api.removesuffix("/v1")
        node_metrics = [base + "/metrics", await metrics_url(middle), await metrics_url(tail)]
        await trio.to_thread.run_sync(wait_covered, base)
        await trio.to_thread.run_sync(chat_answers_and_stops, browser, base, api, node_metrics)

        await trio.to_thread.run_sync(browser.get, base + "/swarm")
        await trio.to_thread.run_sync(swarm_page_shows, browser, "3", "0", 30)
        rows = await trio.to_thread.run_sync(browser.find_elements, "css selector", "#peers tr.peer")
        assert len(rows) == 3
        await trio.to_thread.run_sync(browser.save_screenshot, str(SCREENSHOTS / "swarm.png"))

        middle.signal(signal.SIGKILL)
        killed_at = trio.current_time()
        await trio.to_thread.run_sync(swarm_page_shows, browser, "2", "1", 20)
        seconds_to_gap = trio.current_time() - killed_at
        assert "gap" in await trio.to_thread.run_sync(text_of, browser, "#summary")
        events = await trio.to_thread.run_sync(text_of, browser, "#events")
        assert f"{middle.peer_id[-6:]} stopped answering" in events
        await trio.to_thread.run_sync(browser.save_screenshot, str(SCREENSHOTS / "swarm-gap.png"))

        replacement = await swarm.add(2, 4)
        await replacement.wait_ready(120)
        await trio.to_thread.run_sync(swarm_page_shows, browser, "3", "0", 30)
        await trio.to_thread.run_sync(browser.save_screenshot, str(SCREENSHOTS / "swarm-healed.png"))
        await trio.to_thread.run_sync(readable_on_a_phone, browser, base)
        assert await middle.wait(5) == -signal.SIGKILL
    print(f"the swarm page showed the gap {seconds_to_gap:.1f} s after the SIGKILL")
