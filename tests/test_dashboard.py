"""`/dashboard` in a real headless Chromium (Debian's `chromium` + `chromium-driver`, driven by
Selenium) against a real `bentoml serve` (two workers) over a real, seeded Redis: the page loads
with no console errors, its charts fill after traffic, a split changed through its form takes
effect in the service, and the same change without a valid token is a 401 that changes nothing.
Also `/performance/report`, `/alerts/active` and the rollback route over HTTP."""

from __future__ import annotations

import os
import shutil
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.conftest import RedisServer, Served, serve, stop, wait_for
from tiffin.auth import mint

pytestmark = pytest.mark.e2e
SECRET = "dashboard-test-secret-0123456789abcdef"
CHROMIUM = os.environ.get("TIFFIN_CHROMIUM", "/usr/bin/chromium")
CHROMEDRIVER = os.environ.get("TIFFIN_CHROMEDRIVER", "/usr/bin/chromedriver")
SCREENSHOT = Path(__file__).resolve().parent.parent / "docs" / "dashboard.png"
MODEL = "species_classifier"


def token(scope: str = "admin") -> str:
    return mint(SECRET, scope, 600)


@pytest.fixture(scope="module")
def app(seeded_redis: RedisServer) -> Iterator[Served]:
    served = serve(
        {
            "JWT_SECRET_KEY": SECRET,
            "REDIS_URL": seeded_redis.url,
            "TIFFIN_TRAFFIC_POLL_INTERVAL_S": "0.1",
            "TIFFIN_ALERT_WINDOW_S": "30",
        },
        "serve-dashboard.log",
    )
    yield served
    stop(served)


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    """Chromium, never downloaded here: `make test` installs Debian's packages when missing."""
    missing = [p for p in (CHROMIUM, CHROMEDRIVER) if shutil.which(p) is None]
    if missing:
        pytest.fail(
            f"{', '.join(missing)} not found: install Debian's chromium and chromium-driver "
            "(`make chromium`, which `make test` runs)",
            pytrace=False,
        )
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu"):
        options.add_argument(arg)
    options.add_argument("--window-size=1400,1800")
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    yield driver
    driver.quit()


def console_errors(driver: Any) -> list[dict[str, Any]]:
    return [e for e in driver.get_log("browser") if e["level"] == "SEVERE"]


def attr(driver: Any, css: str, name: str) -> str | None:
    found = driver.find_elements("css selector", css)
    return found[0].get_attribute(name) if found else None


def until(predicate: Any, timeout: float, what: str) -> None:
    wait_for(predicate, timeout, what)


def traffic(app: Served, seconds: float) -> threading.Thread:
    """Card fraud (feature store) and seed 004 requests for `seconds`, from a thread."""

    def run() -> None:
        deadline = time.monotonic() + seconds
        with httpx.Client(base_url=app.url, timeout=30) as client:
            i = 0
            while time.monotonic() < deadline:
                card = {"card_id": f"card_{i % 500:08d}", "transaction_amount": 10.0 + i % 300}
                assert client.post("/score/fraud", json=card).status_code == 200
                row = [5.1 + (i % 7) / 3, 3.5, 1.4 + (i % 5), 0.2 + (i % 3) / 2]
                body = {"instances": [row]}
                assert client.post("/v1/models/predict", json=body).status_code == 200
                i += 1
                time.sleep(0.02)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread


def test_page_loads_and_charts_fill_after_traffic(app: Served, browser: Any) -> None:
    browser.get(f"{app.url}/dashboard")
    until(lambda: attr(browser, "body", "data-polls") not in (None, "0"), 30, "first poll")
    assert console_errors(browser) == []
    assert browser.find_element("css selector", "#status").get_attribute("data-state") == "ok"

    worker = traffic(app, 14)
    card = '[data-model="card_fraud"]'

    def filled() -> bool:
        rate = attr(browser, f'canvas[data-chart="rate"]{card}', "data-points")
        dist = attr(browser, f'canvas[data-chart="distribution"]{card}', "data-points")
        p95 = attr(browser, f'canvas[data-chart="p95"][data-model="{MODEL}"]', "data-points")
        return int(rate or 0) >= 3 and int(dist or 0) >= 2 and int(p95 or 0) >= 3

    until(filled, 60, "charts with data")
    worker.join()
    # the per-version table shows what the service counted
    rows = browser.find_elements("css selector", '#model-card_fraud tr[data-version="v1.0"] td')
    assert int(rows[3].text) >= 50
    freshness = browser.find_element("css selector", "#freshness tbody").text
    assert "card_fraud" in freshness and " s" in freshness
    # /drift answers for every tabular model (drift is served), so the panel lists them
    assert "card_fraud" in browser.find_element("css selector", "#drift").text
    assert console_errors(browser) == []


def split(app: Served) -> dict[str, int]:
    return httpx.get(f"{app.url}/v1/traffic-split", params={"model": MODEL}).json()


def submit_split(driver: Any, weights: dict[str, int], bearer: str) -> str:
    from selenium.webdriver.support.ui import Select

    driver.find_element("css selector", "#token").clear()
    if bearer:
        driver.find_element("css selector", "#token").send_keys(bearer)
    Select(driver.find_element("css selector", "#split-model")).select_by_value(MODEL)
    for box in driver.find_elements("css selector", "#split-weights input"):
        box.clear()
        box.send_keys(str(weights.get(box.get_attribute("data-version") or "", 0)))
    driver.execute_script("document.querySelector('#split-result').dataset.status = ''")
    driver.find_element("css selector", "#split-apply").click()
    until(
        lambda: attr(driver, "#split-result", "data-status") not in ("", "pending", None),
        60,
        "the split answer",
    )
    return attr(driver, "#split-result", "data-status") or ""


def test_split_changed_on_the_page_takes_effect(app: Served, browser: Any) -> None:
    browser.get(f"{app.url}/dashboard")
    until(lambda: attr(browser, "body", "data-polls") not in (None, "0"), 30, "first poll")
    assert split(app) == {"v1": 100}
    assert submit_split(browser, {"v1": 70, "v2": 30}, token("traffic:write")) == "200"
    assert split(app) == {"v1": 70, "v2": 30}
    # every worker routes by it: pinned-free requests reach both versions
    seen = set()
    with httpx.Client(base_url=app.url, timeout=30) as client:
        for i in range(200):
            body = {"instances": [[5.0 + i / 100, 3.4, 1.5, 0.2]]}
            seen.add(client.post("/v1/models/predict", json=body).json()["model_version"])
    assert seen == {"v1", "v2"}
    # and the page shows it on its next poll
    until(
        lambda: "v2: 30 %" in browser.find_element("css selector", "#splits").text,
        10,
        "the new split on the page",
    )
    assert console_errors(browser) == []


def test_split_without_a_valid_token_is_401_and_changes_nothing(app: Served, browser: Any) -> None:
    before = split(app)
    browser.get(f"{app.url}/dashboard")
    until(lambda: attr(browser, "body", "data-polls") not in (None, "0"), 30, "first poll")
    browser.get_log("browser")  # start from a clean console
    for bearer in ("", "not-a-jwt", mint("some-other-secret-0123456789abcdef", "admin", 600)):
        assert submit_split(browser, {"v1": 50, "v2": 50}, bearer) == "401"
        assert "401 unauthorized" in browser.find_element("css selector", "#split-result").text
        assert split(app) == before
    # the only console errors are the browser reporting those three 401s
    errors = console_errors(browser)
    assert len(errors) == 3 and all("401" in e["message"] for e in errors), errors


def species_traffic(app: Served, n: int) -> None:
    with httpx.Client(base_url=app.url, timeout=30) as client:
        for i in range(n):
            body = {"instances": [[4.8 + (i % 30) / 10, 3.0 + (i % 4) / 4, 1.4 + (i % 5), 0.3]]}
            assert client.post("/v1/models/predict", json=body).status_code == 200


def test_canary_rolled_back_from_the_page(app: Served, browser: Any) -> None:
    admin = {"Authorization": f"Bearer {token()}"}
    assert httpx.post(
        f"{app.url}/v1/traffic-split", params={"model": MODEL}, json={"v1": 100}, headers=admin
    ).is_success
    started = httpx.post(
        f"{app.url}/models/{MODEL}:v2/deploy",
        json={
            "strategy": "canary",
            "steps": [20, 100],
            "analysis_window_s": 3600,
            # v2 is a different model: its score distribution may differ from v1's by design
            "thresholds": {"max_score_psi": None},
        },
        headers=admin,
        timeout=60,
    )
    assert started.status_code == 202, started.text
    deployment = started.json()["id"]
    browser.get(f"{app.url}/dashboard")
    row = f'#deployments tr[data-deployment="{deployment}"]'
    until(lambda: bool(browser.find_elements("css selector", row)), 30, "the canary's row")
    assert "collecting" in browser.find_element("css selector", row).text
    worker = traffic(app, 6)
    species_traffic(app, 400)  # ~80 for the canary: past min_samples, a verdict is drawn
    worker.join()
    until(lambda: "healthy" in browser.find_element("css selector", row).text, 30, "a verdict")
    assert "v2: 20 %" in browser.find_element("css selector", "#splits").text
    SCREENSHOT.parent.mkdir(exist_ok=True)
    height = browser.execute_script("return document.documentElement.scrollHeight")
    browser.set_window_size(1400, height + 120)  # the whole page in docs/dashboard.png
    browser.save_screenshot(str(SCREENSHOT))
    browser.find_element("css selector", "#token").send_keys(token("models:write"))
    browser.find_element("css selector", f'{row} button[data-action="rollback"]').click()
    until(
        lambda: attr(browser, "#action-result", "data-status") not in ("", "pending", None),
        60,
        "the rollback answer",
    )
    assert attr(browser, "#action-result", "data-status") == "200"
    assert split(app) == {"v1": 100}
    until(
        lambda: "rolled back" in browser.find_element("css selector", row).text,
        10,
        "the rolled back canary on the page",
    )
    assert console_errors(browser) == []


def test_rollback_needs_a_token_and_stops_a_canary(app: Served) -> None:
    url = app.url
    canary = {"strategy": "canary", "steps": [20, 100], "analysis_window_s": 600}
    with httpx.Client(base_url=url, timeout=60) as client:
        assert client.post(
            f"/v1/traffic-split?model={MODEL}",
            json={"v1": 100},
            headers={"Authorization": f"Bearer {token()}"},
        ).is_success
        started = client.post(
            f"/models/{MODEL}:v2/deploy",
            json=canary,
            headers={"Authorization": f"Bearer {token('models:write')}"},
        )
        assert started.status_code == 202, started.text
        deployment = started.json()["id"]
        listed = client.get("/dashboard/data").json()["deployments"]
        mine = next(d for d in listed if d["id"] == deployment)
        assert mine["status"] == "in_progress" and mine["verdict"].startswith("collecting")
        refused = client.post(f"/deployments/{deployment}/rollback")
        assert refused.status_code == 401
        assert client.get(f"/v1/traffic-split?model={MODEL}").json() == {"v1": 80, "v2": 20}
        rolled = client.post(
            f"/deployments/{deployment}/rollback",
            headers={"Authorization": f"Bearer {token('models:write')}"},
        )
        assert rolled.status_code == 200, rolled.text
        assert rolled.json()["status"] == "rolled_back"
        assert client.get(f"/v1/traffic-split?model={MODEL}").json() == {"v1": 100}
        again = client.post(
            f"/deployments/{deployment}/rollback",
            headers={"Authorization": f"Bearer {token('models:write')}"},
        )
        assert again.status_code == 409 and "rolled_back" in again.json()["error"]
        missing = client.post(
            "/deployments/nope/rollback",
            headers={"Authorization": f"Bearer {token('models:write')}"},
        )
        assert missing.status_code == 404 and "nope" in missing.json()["error"]
        listed = client.get("/dashboard/data").json()["deployments"]
        assert next(d for d in listed if d["id"] == deployment)["verdict"].startswith("rolled back")


def test_performance_report_and_alerts_over_http(app: Served) -> None:
    traffic(app, 3).join()
    with httpx.Client(base_url=app.url, timeout=60) as client:
        report = client.get("/performance/report").json()
        card = report["models"]["card_fraud"]["versions"]["v1.0"]
        assert card["total"]["requests"] >= 50 and card["weight"] == 100, card
        assert card["total"]["latency_ms"]["p95"] is not None
        assert card["total"]["prediction_distribution"]
        ages = report["feature_freshness"]["models"]["card_fraud"]
        assert 0 < ages["v1.0"] < 3600
        assert report["circuit_breaker"]["state"] == "closed"
        assert 0 < report["memory"]["fraction"] < 1
        assert report["thresholds"]["p95_ms"] == 100.0
        # the page's files, and nothing else from the package
        assert client.get("/dashboard").headers["content-type"].startswith("text/html")
        assert "javascript" in client.get("/dashboard/app.js").headers["content-type"]
        for path in ("/dashboard/nope.js", "/dashboard/%2E%2E%2Fmonitoring.py"):
            assert client.get(path).status_code == 404, path
        alerts = client.get("/alerts/active").json()

        assert alerts["count"] == len(alerts["alerts"])
        for alert in alerts["alerts"]:
            assert {"name", "severity", "value", "threshold", "since", "message"} <= set(alert)
