"""GET /dashboard in headless Chromium (Selenium) against a real gunicorn: the page loads
from this origin with no console errors, its charts and tables fill with live traffic, the
prediction form answers what the API answers, the drift panel shows a drifted feature, a
training run streams to a new version (and a missing token shows the 401), and the page
finds the server again after a restart on the same port.

One server and one browser serve the whole module (the restart test swaps in a new server on
the same port). A screenshot of the page after each test goes to TEST_ARTIFACTS_DIR (default
``test-artifacts/dashboard/``).
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import requests
from selenium import webdriver
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.remote.webelement import WebElement
from selenium.webdriver.support.ui import Select
from sklearn import datasets
from sklearn.model_selection import train_test_split

from tests.conftest import ADMIN_TOKEN, ROOT, LiveServer, wait_until

# Starts servers of its own or runs for long: not in the fast subset (-m 'not slow').
pytestmark = pytest.mark.slow

CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = Path("/usr/bin/chromedriver")
ARTIFACTS = Path(os.environ.get("TEST_ARTIFACTS_DIR") or ROOT / "test-artifacts" / "dashboard")
CHROME_FLAGS = ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic",
                "--no-first-run", "--disable-background-networking",
                "--disable-component-update", "--disable-sync", "--disable-dev-shm-usage",
                "--window-size=1440,2100")
# The page holds a WebSocket and an SSE stream open: without a short grace a stopping worker
# would wait 30 s for them.
SERVER_ENV = {"GRACEFUL_TIMEOUT": "1", "MODEL_POLL_SECONDS": "1"}
ASSETS = {"/dashboard/dashboard.js": "text/javascript", "/dashboard/dashboard.css": "text/css",
          "/dashboard/uPlot.iife.min.js": "text/javascript",
          "/dashboard/uPlot.min.css": "text/css"}


class Dashboard:
    """The module's server and a browser showing its /dashboard."""

    def __init__(self, server: LiveServer, driver: webdriver.Chrome, tmp: Path,
                 repo: Path) -> None:
        self.server, self.driver, self.tmp, self.repo = server, driver, tmp, repo
        self.load_errors: list[str] = []  # console errors while the page first loaded

    def js(self, script: str, *args: Any) -> Any:
        return self.driver.execute_script(script, *args)

    def state(self, expression: str) -> Any:
        """A value of the page's ``window.dashboard`` (JSON-like, copied out)."""
        return self.js(f"return window.dashboard.{expression};")

    def connected(self) -> bool:
        data = self.js("return [document.body.dataset.monitor, document.body.dataset.events];")
        return bool(data == ["open", "open"])

    def find(self, css: str) -> WebElement:
        return self.driver.find_element(By.CSS_SELECTOR, css)

    def console_errors(self, *allowed: str) -> list[str]:
        """SEVERE console entries since the last call, but those matching ``allowed``."""
        return [entry["message"] for entry in self.driver.get_log("browser")
                if entry["level"] == "SEVERE"
                and not any(re.search(pattern, entry["message"]) for pattern in allowed)]

    def restart_on_same_port(self) -> LiveServer:
        """Stop the server (by PID) and start a new one on its port, over the same models."""
        old = self.server
        old.stop()
        new = LiveServer(self.tmp / "logs", self.repo, **SERVER_ENV)
        new.port, new.url = old.port, old.url
        new.env["BIND"] = f"127.0.0.1:{old.port}"
        self.server = new
        return new.start()


def require_browser() -> None:
    """Fail (never skip) when the browser is missing: CI must not go green without it."""
    for tool, package in ((CHROMIUM, "chromium"), (CHROMEDRIVER, "chromium-driver")):
        if not os.access(tool, os.X_OK):
            pytest.fail(f"{tool} is missing: the dashboard's browser test needs Debian's "
                        f"'{package}' (scripts/test installs it: apt-get install chromium "
                        "chromium-driver)", pytrace=False)


def start_browser(profile: Path) -> webdriver.Chrome:
    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for flag in CHROME_FLAGS:
        options.add_argument(flag)
    options.add_argument(f"--user-data-dir={profile}")
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    # An explicit driver path: Selenium Manager never runs, so nothing is downloaded.
    return webdriver.Chrome(service=Service(executable_path=str(CHROMEDRIVER)), options=options)


@pytest.fixture(scope="module")
def dash(demo_repo: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Dashboard]:
    tmp = tmp_path_factory.mktemp("dashboard")
    repo = Path(shutil.copytree(demo_repo, tmp / "models"))  # training adds versions here
    require_browser()
    server = LiveServer(tmp / "logs", repo, **SERVER_ENV)
    with ThreadPoolExecutor(1) as pool:  # the browser starts while the workers boot
        browser = pool.submit(start_browser, tmp / "chrome-profile")
        try:
            server.start()
        except BaseException:
            with contextlib.suppress(Exception):
                browser.result().quit()
            raise
        try:
            driver = browser.result()
        except BaseException:
            server.stop()
            raise
    page = Dashboard(server, driver, tmp, repo)
    try:
        driver.get(server.url + "/dashboard")
        wait_until(page.connected, 15)
        page.load_errors = page.console_errors()
        yield page
    finally:
        driver.quit()
        page.server.stop(quick=True)


@pytest.fixture(autouse=True)
def screenshot(dash: Dashboard, request: pytest.FixtureRequest) -> Iterator[None]:
    """Start each test with an empty console log (so one test's expected errors never fail
    the next); keep a picture of the page after it."""
    dash.driver.get_log("browser")
    yield
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    name = re.sub(r"[^A-Za-z0-9_.-]+", "-", request.node.name).strip("-")
    dash.driver.save_screenshot(str(ARTIFACTS / f"{name}.png"))


def test_page_loads_from_this_origin_without_console_errors(dash: Dashboard) -> None:
    resp = requests.get(dash.server.url + "/dashboard", timeout=10)
    assert resp.status_code == 200
    assert resp.headers["Content-Type"].startswith("text/html")
    csp = resp.headers["Content-Security-Policy"]
    assert "script-src 'self'" in csp and "default-src 'none'" in csp
    assert f"connect-src 'self' ws://127.0.0.1:{dash.server.port}" in csp
    urls = re.findall(r'(?:src|href)="([^"]+)"', resp.text)
    assert sorted(u for u in urls if u != "data:,") == sorted(ASSETS), urls
    for url, media in ASSETS.items():
        asset = requests.get(dash.server.url + url, timeout=10)
        assert asset.status_code == 200 and asset.headers["Content-Type"].startswith(media)
        # No other origin anywhere (uPlot's banner comment names its home page).
        text = asset.text.replace("/*! https://github.com/leeoniya/uPlot", "")
        assert not re.search(r"https?://", text), url
    assert not re.search(r"https?://", resp.text)
    for name in ("index.html", "LICENSE", "README.md", "..%2F__init__.py"):
        assert requests.get(f"{dash.server.url}/dashboard/{name}", timeout=10).status_code == 404

    assert dash.js("return typeof uPlot;") == "function"
    assert len(dash.driver.find_elements(By.CSS_SELECTOR, ".uplot canvas")) == 3
    wait_until(lambda: len(dash.driver.find_elements(By.CSS_SELECTOR, "#models-body tr")) == 3)
    wait_until(lambda: dash.driver.find_elements(By.CSS_SELECTOR,
                                                 '.experiment[data-name="iris-ab"]'))
    wait_until(lambda: dash.state("series.t.length") >= 2)
    wait_until(lambda: dash.find("#summary").text.startswith("2 workers"), 5)
    assert dash.load_errors == []
    assert dash.console_errors() == []


def test_charts_and_tables_fill_with_live_traffic(dash: Dashboard) -> None:
    start = time.time()
    before = dash.state("figures.per_model['iris:2'] || 0")
    hits_before = dash.state("figures.cache.hits")
    for i in range(300):  # 20 distinct rows: the other 280 are cache hits
        row = [5.0 + (i % 20) / 10, 3.0, 1.5, 0.2]
        assert dash.server.post("/predict/iris/versions/2", json={"features": row}).ok

    def drawn_after(series: int) -> list[float]:
        """The points of one series of a chart that came after ``start``."""
        x, y = dash.js(f"const d = window.dashboard.charts.{chart}.data; "
                       f"return [d[0], d[{series}]];")
        return [v for t, v in zip(x, y) if t >= start - 1 and v is not None]

    chart = "rps"  # the page's own requests stay well under 10 a second
    wait_until(lambda: max(drawn_after(1), default=0) >= 10, 10)
    chart = "latency"
    wait_until(lambda: drawn_after(2), 5)  # p99
    chart = "cache"
    wait_until(lambda: max(drawn_after(1), default=0) > 0.5, 5)
    wait_until(lambda: dash.state("figures.per_model['iris:2']") >= before + 300, 5)
    assert dash.state("figures.cache.hits") >= hits_before + 280

    traffic = dash.find('#traffic-body tr[data-key="iris:2"]').text
    assert traffic.startswith("iris v2")
    assert dash.find("#rps-now").text.endswith("/s")
    assert re.fullmatch(r"p50 [0-9.]+ · p99 [0-9.]+", dash.find("#latency-now").text)
    wait_until(lambda: len(dash.driver.find_elements(By.CSS_SELECTOR, "#workers-body tr")) == 2,
               5)
    assert dash.find("#rss-total").text.endswith(" MB")
    assert dash.console_errors() == []


def test_ab_arms_show_counts_outcome_rates_and_p_value(dash: Dashboard) -> None:
    for i in range(90):
        # A connection per user, so both workers count some of each arm; the outcome goes on
        # the prediction's connection: without Redis only the worker that served a user
        # takes their outcome.
        user = {"user_id": f"dash-{i}"}
        with requests.Session() as conn:
            assert conn.post(dash.server.url + "/predict/ab", timeout=10, json={
                "experiment": "iris-ab", "features": [5.9, 3.0, 4.2, 1.5], **user}).ok
            assert conn.post(dash.server.url + "/experiments/iris-ab/outcome", timeout=10,
                             json={**user, "value": int(i % 3 == 0)}).ok

    def arms() -> dict[str, Any] | None:
        shown = dash.state("experiments") or {}
        exp = next((e for e in shown.get("experiments", []) if e["name"] == "iris-ab"), None)
        return exp["arms"] if exp and exp["arms"]["treatment"].get("p_value") else None

    shown = wait_until(arms, 10)
    assert shown["control"]["requests"] > 0 and shown["treatment"]["requests"] > 0
    # Counts are per worker without Redis: wait for a poll that shows the whole row.
    wait_until(lambda: re.search(r"v2 50 \d+ \d+ [0-9.]+ % [0-9.e-]+ vs control$", dash.find(
        '.experiment[data-name="iris-ab"] tr[data-arm="treatment"]').text), 10)
    assert dash.console_errors() == []


@pytest.mark.parametrize(("model", "version", "row"), [
    ("iris", "1", [6.1, 2.8, 4.7, 1.2]),
    ("iris", "canary", [6.3, 3.3, 6.0, 2.5]),
    ("diabetes", "latest", [0.038, 0.05, 0.062, 0.022, -0.044, -0.035, -0.043, -0.003, 0.02,
                            -0.018]),
])
def test_prediction_form_answers_as_the_api(dash: Dashboard, model: str, version: str,
                                            row: list[float]) -> None:
    previous = dash.state("prediction && window.dashboard.prediction.request_id")
    Select(dash.find("#predict-model")).select_by_value(model)
    Select(dash.find("#predict-version")).select_by_value(version)

    def feature_inputs() -> list[WebElement] | None:
        found = dash.driver.find_elements(By.CSS_SELECTOR, "#predict-features input")
        return found if len(found) == len(row) else None

    inputs = wait_until(feature_inputs, 5)
    for field, value in zip(inputs, row):
        field.clear()
        field.send_keys(str(value))
    dash.find("#predict-submit").click()
    shown = wait_until(lambda: (p := dash.state("prediction")) and p["request_id"] != previous
                       and p, 5)

    api = dash.server.post(f"/predict/{model}/versions/{version}", json={"features": row})
    assert api.status_code == 200
    expected = api.json()
    for volatile in ("request_id", "cached"):
        shown.pop(volatile)
        expected.pop(volatile)
    assert shown == expected
    assert dash.find('#predict-answer dd[data-field="version"]').text == \
        f"v{expected['version']}"
    if "label" in expected:
        assert dash.find('#predict-answer dd[data-field="label"]').text == expected["label"]
        rows = dash.driver.find_elements(By.CSS_SELECTOR, "#predict-probabilities tbody tr")
        assert len(rows) == len(expected["probabilities"])
    assert dash.find("#predict-error").get_attribute("hidden") is not None
    assert dash.console_errors() == []


def test_drift_panel_shows_the_drifted_feature(dash: Dashboard) -> None:
    """2,000 iris rows with the sepal width shifted by 1.5 standard deviations: the panel
    picks the most drifted version by itself, puts that feature first with a bar coloured
    as drifted, and draws its live bins against the training ones."""
    data = datasets.load_iris()
    X, *_ = train_test_split(data.data, data.target, test_size=0.25, random_state=42)
    X = np.asarray(X)
    rows = X[np.random.default_rng(0).integers(0, len(X), 2000)]
    rows[:, 1] += 1.5 * X[:, 1].std()
    for start in range(0, len(rows), 100):
        assert dash.server.fresh("POST", "/predict/batch", json={
            "model": "iris", "version": "1", "instances": rows[start:start + 100].tolist()}).ok

    wait_until(lambda: dash.driver.find_elements(
        By.CSS_SELECTOR, '#drift-body tr[data-feature="sepal_width"][data-status="drifted"]'), 20)
    assert dash.find("#drift-status").text == "iris v1: drifted"
    assert dash.find("#drift-status").get_attribute("data-status") == "drifted"
    shown = [(tr.get_attribute("data-feature"), tr.get_attribute("data-status"))
             for tr in dash.driver.find_elements(By.CSS_SELECTOR, "#drift-body tr")]
    assert shown[0] == ("sepal_width", "drifted")  # the worst first
    assert {f for f, status in shown if status == "drifted"} == {"sepal_width"}
    assert {f for f, _ in shown} == {"sepal_length", "sepal_width", "petal_length",
                                     "petal_width", "(prediction)"}
    bar = dash.find('#drift-body tr[data-feature="sepal_width"] .bar')
    assert "status-drifted" in (bar.get_attribute("class") or "")
    assert bar.value_of_css_property("background-color") == "rgba(220, 38, 38, 1)"  # --bad
    bins = dash.find("#drift-bins")
    assert bins.is_displayed() and bins.get_attribute("data-feature") == "sepal_width"
    assert len(bins.find_elements(By.CSS_SELECTOR, ".bin")) == 9
    assert dash.find("#drift-bins-title").text.startswith("Most drifted feature: sepal_width")
    assert dash.state("drift.shown.worst_feature") == "sepal_width"
    # The change came as a server event too.
    wait_until(lambda: dash.driver.find_elements(
        By.CSS_SELECTOR, '#events-list li[data-type="drift"]'), 10)
    assert "sepal_width stable → drifted" in dash.find(
        '#events-list li[data-type="drift"]').text
    assert dash.console_errors() == []


def test_training_without_the_token_shows_the_401(dash: Dashboard) -> None:
    dash.find("#forget-token").click()
    Select(dash.find("#train-model")).select_by_value("iris")
    dash.find("#train-submit").click()
    error = wait_until(lambda: (e := dash.find("#train-error")).is_displayed() and e, 10)
    assert error.get_attribute("data-status") == "401"
    assert error.text.startswith("401 unauthorized: admin token missing or wrong")
    assert "Type the server's ADMIN_TOKEN" in error.text
    assert dash.state("training.state") == "failed"
    assert dash.js("return sessionStorage.getItem('dashboard.adminToken');") is None
    # The browser reports every 4xx answer on the console: that one, and nothing else.
    assert dash.console_errors(r"/train/stream - Failed to load resource: .* status of 401") \
        == []


def test_training_streams_progress_and_ends_with_a_new_version(dash: Dashboard) -> None:
    latest = int(dash.server.get("/models/iris").json()["latest"])
    token = dash.find("#admin-token")
    token.clear()
    token.send_keys(ADMIN_TOKEN)
    epochs = dash.find("#train-epochs")
    epochs.clear()
    epochs.send_keys("5")
    Select(dash.find("#train-model")).select_by_value("iris")
    dash.find("#train-submit").click()

    wait_until(lambda: dash.state("training.state") != "running", 30)
    training = dash.state("training")
    assert training["state"] == "complete", training
    assert training["version"] == str(latest + 1)
    assert [e["epoch"] for e in training["epochs"]] == [1, 2, 3, 4, 5]
    assert all(e["total_epochs"] == 5 for e in training["epochs"])
    assert dash.find("#train-text").text == f"iris v{latest + 1} trained and serving"
    assert dash.find("#train-progress").get_attribute("value") == "1"
    assert len(dash.driver.find_elements(By.CSS_SELECTOR, "#train-epochs-list li")) == 5
    assert dash.find("#train-error").get_attribute("hidden") is not None

    # The new version is served, and the page learns of it from /stream/events.
    assert dash.server.post(f"/predict/iris/versions/{latest + 1}",
                            json={"features": [5.1, 3.5, 1.4, 0.2]}).ok
    wait_until(lambda: dash.driver.find_elements(
        By.CSS_SELECTOR, '#events-list li[data-type="training_complete"]'), 10)
    Select(dash.find("#predict-model")).select_by_value("iris")
    wait_until(lambda: dash.driver.find_elements(
        By.CSS_SELECTOR, f'#predict-version option[value="{latest + 1}"]'), 10)
    # The token stays in this tab only.
    assert dash.js("return sessionStorage.getItem('dashboard.adminToken');") == ADMIN_TOKEN
    assert dash.js("return localStorage.length;") == 0
    assert dash.js("return document.cookie;") == ""
    assert dash.console_errors() == []


def test_page_reconnects_after_a_server_restart(dash: Dashboard) -> None:
    opened = dash.state("connections")
    server = dash.restart_on_same_port()
    restarted = time.time()
    assert dash.server is server

    def reconnected() -> bool:
        now = dash.state("connections")
        return dash.connected() and all(now[k]["opened"] > opened[k]["opened"] for k in now)

    wait_until(reconnected, 20)
    events = [e["kind"] for e in dash.state("events")]
    assert "disconnected" in events and "reconnected" in events

    for _ in range(50):
        assert server.post("/predict/diabetes", json={"features": [0.01] * 10}).ok
    # The new server's figures reach the page: its own counters, drawn after the restart.
    wait_until(lambda: (dash.state("figures.per_model")).get("diabetes:1", 0) >= 50, 10)
    x, rps = dash.js("return window.dashboard.charts.rps.data;")
    assert max((v or 0) for t, v in zip(x, rps) if t > restarted) > 0
    assert dash.find("#monitor-badge").text.endswith("live")
    # While the server was away the browser logged the failed connections; nothing else.
    url = re.escape(server.url.replace("http://", ""))
    assert dash.console_errors(rf"WebSocket connection to 'ws://{url}/ws/monitor' failed",
                               rf"http://{url}/\S+ - Failed to load resource: net::ERR_") == []


def test_under_api_keys_the_page_asks_once_and_its_live_feeds_use_tokens(
        demo_repo: Path, tmp_path: Path) -> None:
    require_browser()
    server = LiveServer(tmp_path / "logs", demo_repo, API_KEYS="dash-key-1", **SERVER_ENV)
    server.start()
    driver = start_browser(tmp_path / "chrome-profile")
    try:
        page = Dashboard(server, driver, tmp_path, demo_repo)
        driver.get(server.url + "/dashboard")
        wait_until(lambda: page.find("#notice").is_displayed(), 10)  # it asks for the key
        assert not page.connected()
        page.find("#api-key").send_keys("dash-key-1")
        page.find("#api-key-save").click()
        wait_until(page.connected, 15)  # EventSource and WebSocket through stream tokens
        assert not page.find("#notice").is_displayed()
        for _ in range(20):
            server.post("/predict/iris", json=[5.1, 3.5, 1.4, 0.2],
                        headers={"X-API-Key": "dash-key-1"})
        wait_until(lambda: (page.state("figures.per_model") or {}).get("iris:2", 0) >= 20, 10)
        assert "dash-key-1" not in driver.current_url
        # only the refusals of the first load, before the key was given
        assert not page.console_errors(r"/models .* 401", r"/stream/events.* 401",
                                       r"/ws/monitor' failed: HTTP Authentication failed",
                                       r"401 \(UNAUTHORIZED\)")
    finally:
        driver.quit()
        server.stop(quick=True)
