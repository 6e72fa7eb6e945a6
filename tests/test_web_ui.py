"""The web pages (``/ui``) on a real uvicorn (127.0.0.1) with the tiny real model: sessions, CSRF, roles and forms
over HTTP, and a researcher's and an administrator's whole path in a real headless Chromium (Debian's
``chromium`` driven through its ``chromedriver`` by selenium). The pages call the same service functions as the
JSON API, whose tests run on both database backends; these run on SQLite."""

import io
import os
import re
import shutil
import time
import zipfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest
from conftest import fresh_database
from test_api import make_models, new_key, running_server, service_env

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = shutil.which("chromedriver")
NO_BROWSER = (
    "browser tests skipped: Debian's chromium and chromium-driver are not installed "
    "(`apt-get install chromium chromium-driver`; .ci/run installs them)"
)
CSRF = re.compile(r'name="csrf" value="([^"]+)"')


@pytest.fixture(scope="module")
def site(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, dict, dict]]:
    root = tmp_path_factory.mktemp("site")
    models = make_models(tiny_model, root)
    with fresh_database("sqlite", root) as url:
        # development: cookies without Secure, so this plain-http test client sends them back (production below)
        env = service_env(root, url, SYNTHCOHORT_MAX_SAMPLES_PER_REQUEST="500", SYNTHCOHORT_ENVIRONMENT="development")
        keys = {name: new_key(env, "--role", role) for name, role in (("admin", "admin"), ("alice", "researcher"))}
        keys["bob"] = new_key(env, "--role", "researcher")
        with running_server(models, env) as base:
            yield base, keys, env


def csrf_of(page: httpx.Response) -> str:
    match = CSRF.search(page.text)
    assert match, page.text[:500]
    return match.group(1)


def sign_in(base: str, key: str) -> httpx.Client:
    client = httpx.Client(base_url=base, timeout=60)
    form = client.get("/ui/sign-in")
    done = client.post("/ui/sign-in", data={"csrf": csrf_of(form), "api_key": key})
    assert done.status_code == 303 and done.headers["location"] == "/ui/models", done.text
    return client


def request_cohort(client: httpx.Client, **fields: str) -> httpx.Response:
    page = client.get("/ui/models/demo/request")
    return client.post("/ui/models/demo/request", data={"csrf": csrf_of(page), **fields})


def wait_finished(client: httpx.Client, job_id: str, timeout: float = 300) -> dict:
    deadline = time.time() + timeout
    while time.time() < deadline:
        status = client.get(f"/ui/jobs/{job_id}/status").json()
        if status["status"] not in ("queued", "running"):
            return status
        time.sleep(0.3)
    raise AssertionError(f"job {job_id} did not finish")


def audit(client: httpx.Client, action: str) -> str:
    return client.get("/ui/admin/audit", params={"action": action}).text


def test_sign_in_gives_a_strict_http_only_cookie_and_the_key_never_comes_back(site) -> None:
    base, keys, _ = site
    anonymous = httpx.Client(base_url=base)
    assert anonymous.get("/ui/models").headers["location"] == "/ui/sign-in"  # signed out: to the sign-in form
    form = anonymous.get("/ui/sign-in")
    refused = anonymous.post("/ui/sign-in", data={"api_key": keys["alice"]})  # no double-submit token
    assert refused.status_code == 403 and "synthcohort_session" not in refused.headers.get("set-cookie", "")
    wrong = anonymous.post("/ui/sign-in", data={"csrf": csrf_of(form), "api_key": keys["alice"] + "x"})
    assert wrong.status_code == 401 and "not valid" in wrong.text and "synthcohort_session" not in str(wrong.cookies)

    done = anonymous.post("/ui/sign-in", data={"csrf": csrf_of(form), "api_key": keys["alice"]})
    cookie = next(c for c in done.headers.get_list("set-cookie") if c.startswith("synthcohort_session="))
    attributes = {part.strip().lower() for part in cookie.split(";")[1:]}
    assert {"httponly", "samesite=strict", "path=/ui"} <= attributes and "secure" not in attributes  # plain http
    assert keys["alice"] not in cookie and keys["alice"].split("_", 2)[2] not in cookie
    page = anonymous.get("/ui/models")
    assert page.status_code == 200 and "demo" in page.text and keys["alice"] not in page.text
    assert "/ui/models/plain/" not in page.text  # the model without DP is not served without the explicit flag
    assert "frame-ancestors 'none'" in page.headers["content-security-policy"]
    assert page.headers["cache-control"] == "no-store" and page.headers["x-content-type-options"] == "nosniff"
    admin = sign_in(base, keys["admin"])
    log = audit(admin, "ui.sign-in")
    assert "refused: invalid key" in log and log.count("<td>ui.sign-in</td>") >= 3
    guesser = httpx.Client(base_url=base)
    token = csrf_of(guesser.get("/ui/sign-in"))
    guesses = [guesser.post("/ui/sign-in", data={"csrf": token, "api_key": "sck_x_y"}).status_code for _ in range(25)]
    assert guesses[0] == 401 and guesses[-1] == 429  # bounded per client address (each attempt is logged)


def test_behind_a_tls_proxy_cookies_are_secure_hsts_is_sent_and_sign_in_limits_follow_the_real_client(
    tiny_model: Path, tmp_path: Path
) -> None:
    """In production (the default) the session cookies are Secure; a trusted proxy's X-Forwarded-Proto: https
    brings HSTS, and its X-Forwarded-For is the address the sign-in limiter counts, so one guesser behind the proxy
    does not lock everyone else out (this test client stands in for the proxy: 127.0.0.1, the default trust)."""
    models = make_models(tiny_model, tmp_path)
    with fresh_database("sqlite", tmp_path) as url, running_server(models, service_env(tmp_path, url)) as base:
        client = httpx.Client(base_url=base, timeout=60)
        plain = client.get("/ui/sign-in")
        assert "strict-transport-security" not in plain.headers  # plain http: no HSTS
        tls = client.get("/ui/sign-in", headers={"X-Forwarded-Proto": "https"})
        assert tls.headers["strict-transport-security"].startswith("max-age=")
        cookie = tls.headers["set-cookie"]
        assert cookie.startswith("synthcohort_sign_in=") and "secure" in cookie.lower()
        token = csrf_of(tls)

        def fail_from(address: str) -> int:
            headers = {"X-Forwarded-For": address, "Cookie": f"synthcohort_sign_in={token}"}
            return client.post("/ui/sign-in", data={"csrf": token, "api_key": "sck_x_y"}, headers=headers).status_code

        guesses = [fail_from("203.0.113.5") for _ in range(25)]
        assert guesses[0] == 401 and guesses[-1] == 429
        assert fail_from("198.51.100.7") == 401  # another client behind the same proxy is not limited


def test_an_api_process_needs_only_public_copies_and_workers_make_the_previews(
    tiny_model: Path, tmp_path: Path
) -> None:
    """`serve --no-worker` on public copies of the bundles (no private/ at all) serves cards and queues jobs; a
    worker holding the whole bundles runs them and makes the model previews; until then the page says "no preview
    yet" and names no path."""
    import subprocess
    import sys

    from test_workers import start_worker

    full = make_models(tiny_model, tmp_path)
    public = tmp_path / "public"
    copied = subprocess.run(
        [sys.executable, "-m", "app.cli", "public-copy", str(full / "demo"), "--out", str(public / "demo")],
        capture_output=True,
        text=True,
    )
    assert copied.returncode == 0, copied.stderr
    assert not (public / "demo" / "private").exists() and (public / "demo" / "filter_summary.json").is_file()
    with fresh_database("sqlite", tmp_path) as url:
        env = service_env(tmp_path, url, SYNTHCOHORT_ENVIRONMENT="development")
        key = new_key(env, "--role", "researcher")
        with running_server(public, env, "--no-worker") as base:
            page = sign_in(base, key)
            models = page.get("/ui/models")
            assert "No preview yet" in models.text and str(tmp_path) not in models.text
            missing = page.get("/ui/models/demo/preview/healthy.png")
            assert missing.status_code == 404 and str(tmp_path) not in missing.text
            card = httpx.get(f"{base}/v1/models/demo", headers={"Authorization": f"Bearer {key}"}).json()
            assert card["memorization_filter"]["canary_rejection_rate"] is not None
            job = page.get("/ui/models/demo/request")
            worker = start_worker(full, env)
            try:
                done = page.post(
                    "/ui/models/demo/request", data={"csrf": csrf_of(job), "count-0": "2", "format-nifti": "on"}
                )
                job_id = done.headers["location"].rsplit("/", 1)[1]
                assert wait_finished(page, job_id)["status"] == "succeeded"
                deadline = time.time() + 300
                while time.time() < deadline and "No preview yet" in page.get("/ui/models").text:
                    time.sleep(0.5)
                grid = page.get("/ui/models/demo/preview/healthy.png")
                assert grid.status_code == 200 and grid.content[:8] == b"\x89PNG\r\n\x1a\n"
            finally:
                worker.terminate()
                worker.wait(timeout=60)


def test_posts_without_the_sessions_csrf_token_are_refused(site) -> None:
    base, keys, _ = site
    alice, bob = sign_in(base, keys["alice"]), sign_in(base, keys["bob"])
    bobs_token = csrf_of(bob.get("/ui/models/demo/request"))
    for data in ({}, {"csrf": "forged"}, {"csrf": bobs_token}):
        response = alice.post("/ui/models/demo/request", data={**data, "count-0": "1", "format-nifti": "on"})
        assert response.status_code == 403 and "security token" in response.text
        assert alice.post("/ui/sign-out", data=data).status_code == 403
    assert "No jobs yet" in alice.get("/ui/jobs").text  # nothing was queued
    assert alice.get("/ui/models").status_code == 200  # and the session is still there


def test_form_errors_are_shown_next_to_their_field_with_the_apis_rules(site) -> None:
    base, keys, _ = site
    alice = sign_in(base, keys["alice"])
    page = request_cohort(alice, **{"count-0": "abc", "format-nifti": "on"})
    assert page.status_code == 422 and re.search(r'id="counts-healthy-error"[^>]*>[^<]*integer', page.text)
    page = request_cohort(alice, **{"format-nifti": "on"})  # nothing asked for
    assert page.status_code == 422 and re.search(r'id="counts-error"[^>]*>[^<]*at least 1', page.text)
    page = request_cohort(alice, **{"count-0": "2", "seed": "-1", "format-nifti": "on"})
    assert page.status_code == 422 and re.search(r'id="seed-error"[^>]*>[^<]*greater than or equal to 0', page.text)
    assert 'value="2"' in page.text  # what was typed stays in the form
    page = request_cohort(alice, **{"count-0": "2", "format-png": "on"})  # NIfTI left out
    assert page.status_code == 422 and re.search(r'id="formats-error"[^>]*>[^<]*must include nifti', page.text)
    page = request_cohort(alice, **{"count-0": "2", "age-min-0": "60", "format-nifti": "on"})
    assert page.status_code == 422 and "not trained on covariates" in page.text
    page = request_cohort(alice, **{"count-0": "501", "format-nifti": "on"})  # the service's per-request cap
    assert page.status_code == 422 and "at most 500 per request" in page.text
    assert "No jobs yet" in alice.get("/ui/jobs").text


def test_researchers_reach_only_their_own_jobs_datasets_and_no_admin_page(site) -> None:
    base, keys, _ = site
    alice, bob, admin = (sign_in(base, keys[name]) for name in ("alice", "bob", "admin"))
    created = request_cohort(alice, **{"count-0": "2", "count-1": "1", "format-nifti": "on", "seed": "3"})
    assert created.status_code == 303
    job_id = created.headers["location"].rsplit("/", 1)[1]
    status = wait_finished(alice, job_id)
    assert status["status"] == "succeeded" and status["done"] == 3 and "rejected" not in status
    page = alice.get(f"/ui/datasets/{job_id}")
    assert page.status_code == 200 and "ε = " in page.text and "Every image in this dataset is synthetic" in page.text
    sample = re.search(r'/ui/datasets/\w+/preview/(images/[^"]+\.nii\.gz)', page.text).group(1)
    preview = alice.get(f"/ui/datasets/{job_id}/preview/{sample}")
    assert preview.status_code == 200 and preview.content[:8] == b"\x89PNG\r\n\x1a\n"

    for path in (f"/ui/jobs/{job_id}", f"/ui/datasets/{job_id}", f"/ui/datasets/{job_id}/archive"):
        assert bob.get(path).status_code == 404, path
    assert bob.get(f"/ui/datasets/{job_id}/files/{sample}").status_code == 404
    assert job_id not in bob.get("/ui/jobs").text
    for path in ("/ui/admin/keys", "/ui/admin/audit"):
        assert bob.get(path).status_code == 403
    keys_page = bob.get("/ui/admin/keys")
    forged = bob.post(f"/ui/admin/keys/{keys['alice'].split('_')[1]}/revoke", data={"csrf": csrf_of(keys_page)})
    assert forged.status_code == 403 and alice.get("/ui/models").status_code == 200
    for trick in ("../../model_card.json", ".shards/x.json", "images/..\\manifest.json"):
        assert alice.get(f"/ui/datasets/{job_id}/files/{trick}").status_code in (400, 404), trick
    assert job_id in admin.get("/ui/jobs").text and "generated" in admin.get(f"/ui/jobs/{job_id}").text
    log = audit(admin, "dataset")
    assert "dataset.view" in log and job_id[:8] in log


def test_a_running_job_is_cancelled_from_the_jobs_page_by_its_owner_only(site) -> None:
    base, keys, env = site
    alice, bob = sign_in(base, keys["alice"]), sign_in(base, keys["bob"])
    created = request_cohort(alice, **{"count-1": "480", "format-nifti": "on"})
    job_id = created.headers["location"].rsplit("/", 1)[1]
    jobs = alice.get("/ui/jobs")
    assert f'action="/ui/jobs/{job_id}/cancel"' in jobs.text
    assert bob.post(f"/ui/jobs/{job_id}/cancel", data={"csrf": csrf_of(bob.get("/ui/jobs"))}).status_code == 404
    done = alice.post(f"/ui/jobs/{job_id}/cancel", data={"csrf": csrf_of(jobs)})
    assert done.status_code == 303 and done.headers["location"] == f"/ui/jobs/{job_id}"
    final = wait_finished(alice, job_id)
    assert final["status"] == "cancelled" and final["done"] < 480
    page = alice.get(f"/ui/jobs/{job_id}")
    assert "cancelled" in page.text and f"/ui/jobs/{job_id}/cancel" not in page.text
    datasets = Path(env["SYNTHCOHORT_DATA_DIR"]) / "datasets"
    assert not (datasets / job_id).exists() and alice.get(f"/ui/datasets/{job_id}").status_code == 404


def test_sign_out_revocation_and_keys_made_on_the_admin_page(site) -> None:
    base, keys, _ = site
    admin = sign_in(base, keys["admin"])
    keys_page = admin.get("/ui/admin/keys")
    created = admin.post(
        "/ui/admin/keys", data={"csrf": csrf_of(keys_page), "role": "researcher", "quota": "7", "expires_days": ""}
    )
    new_key = re.search(r'<output id="new-key-value">([^<]+)</output>', created.text).group(1)
    assert new_key not in admin.get("/ui/admin/keys").text  # shown once
    prefix = new_key.split("_")[1]
    assert re.search(rf"{prefix}</code>.*?value=\"7\"", admin.get("/ui/admin/keys").text, re.S)
    carol = sign_in(base, new_key)
    over_quota = request_cohort(carol, **{"count-0": "8", "format-nifti": "on"})
    assert over_quota.status_code == 422 and "daily quota exceeded" in over_quota.text
    assert httpx.get(f"{base}/v1/models", headers={"Authorization": f"Bearer {new_key}"}).status_code == 200

    admin.post(f"/ui/admin/keys/{prefix}/revoke", data={"csrf": csrf_of(keys_page)})
    assert carol.get("/ui/models").headers["location"] == "/ui/sign-in"  # revocation ends the session at once
    assert "revoked " + prefix in audit(admin, "key.revoke")

    alice = sign_in(base, keys["alice"])
    old_cookie = alice.cookies.get("synthcohort_session")
    done = alice.post("/ui/sign-out", data={"csrf": csrf_of(alice.get("/ui/models"))})
    assert done.status_code == 303 and done.headers["location"] == "/ui/sign-in"
    replay = httpx.get(f"{base}/ui/models", cookies={"synthcohort_session": old_cookie})
    assert replay.status_code == 303 and replay.headers["location"] == "/ui/sign-in"
    assert "ui.sign-out" in audit(admin, "ui.sign-out")


# ------------------------------------------------------------------------------------------------ in a browser
@contextmanager
def chromium(downloads: Path):
    if not (CHROMIUM and CHROMEDRIVER):
        pytest.skip(NO_BROWSER)
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1280,1000"):
        options.add_argument(flag)
    options.add_experimental_option(
        "prefs", {"download.default_directory": str(downloads), "download.prompt_for_download": False}
    )
    driver = webdriver.Chrome(service=Service(executable_path=CHROMEDRIVER), options=options)
    driver.implicitly_wait(2)
    try:
        yield driver
    finally:
        driver.quit()


def screenshot(driver, name: str, tmp_path: Path) -> None:
    """Pages as the README shows them (``SYNTHCOHORT_SCREENSHOTS=docs/screenshots`` refreshes those)."""
    folder = Path(os.environ.get("SYNTHCOHORT_SCREENSHOTS") or tmp_path)
    folder.mkdir(parents=True, exist_ok=True)
    height = driver.execute_script("return document.body.scrollHeight")
    driver.set_window_size(1280, min(max(height + 40, 600), 2400))
    assert driver.save_screenshot(str(folder / f"{name}.png"))


def wait_until(condition, timeout: float = 300.0, every: float = 0.3):
    deadline = time.time() + timeout
    while time.time() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(every)
    raise AssertionError("the page did not get there in time")


def images_loaded(driver) -> bool:
    return driver.execute_script(
        "const imgs = [...document.querySelectorAll('main img')];"
        "return imgs.length > 0 && imgs.every(i => i.complete && i.naturalWidth > 0);"
    )


def test_a_researcher_signs_in_requests_watches_opens_and_downloads_in_chromium(site, tmp_path: Path) -> None:
    import nibabel as nib
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys

    base, keys, _ = site
    downloads = tmp_path / "downloads"
    downloads.mkdir()
    with chromium(downloads) as driver:
        # 1. sign in with the keyboard only
        driver.get(f"{base}/ui/")
        assert driver.current_url.endswith("/ui/sign-in")
        screenshot(driver, "sign-in", tmp_path)
        for _ in range(6):
            if driver.switch_to.active_element.get_attribute("id") == "api_key":
                break
            ActionChains(driver).send_keys(Keys.TAB).perform()
        assert driver.switch_to.active_element.get_attribute("id") == "api_key"
        driver.switch_to.active_element.send_keys(keys["alice"], Keys.ENTER)
        wait_until(lambda: driver.current_url.endswith("/ui/models"), 30)
        assert driver.get_cookie("synthcohort_session")["httpOnly"] is True
        assert driver.execute_script("return document.cookie") == ""  # invisible to scripts

        # 2. models, with their filtered synthetic previews
        wait_until(lambda: images_loaded(driver), 120)
        assert "ε = " in driver.find_element(By.TAG_NAME, "main").text
        screenshot(driver, "models", tmp_path)

        # 3. request a cohort
        driver.find_element(By.LINK_TEXT, "Request a cohort from demo").click()
        driver.find_element(By.ID, "count-0").send_keys("3")
        driver.find_element(By.ID, "count-1").send_keys("2")
        driver.find_element(By.ID, "format-png").click()  # NIfTI is ticked already
        screenshot(driver, "request", tmp_path)
        driver.find_element(By.CSS_SELECTOR, "main button[type=submit]").click()

        # 4. watch it finish (live progress reloads the page when it is done)
        wait_until(lambda: "/ui/jobs/" in driver.current_url, 30)
        assert driver.find_element(By.ID, "job-done").text.endswith("of 5")
        wait_until(lambda: driver.find_elements(By.LINK_TEXT, "Open the dataset"), 300)
        assert driver.find_element(By.ID, "job-status").text == "succeeded"
        assert driver.find_element(By.ID, "job-done").text == "5 of 5"
        screenshot(driver, "job", tmp_path)

        # 5. the dataset: summary, privacy report, previews, downloads
        driver.find_element(By.LINK_TEXT, "Open the dataset").click()
        wait_until(lambda: images_loaded(driver), 60)
        dataset_url = driver.current_url
        text = driver.find_element(By.TAG_NAME, "main").text
        assert "5 (3 healthy, 2 lesion)" in text and "NOT part of the differential-privacy guarantee" in text
        screenshot(driver, "dataset", tmp_path)
        driver.find_element(By.LINK_TEXT, "Download everything (zip)").click()
        archive = wait_until(lambda: next(iter(downloads.glob("*.zip")), None), 60)
        wait_until(lambda: not list(downloads.glob("*.crdownload")), 60)
        with zipfile.ZipFile(io.BytesIO(archive.read_bytes())) as zf:
            names = [n for n in zf.namelist() if n.endswith(".nii.gz")]
            assert len(names) == 5 and "privacy_report.json" in zf.namelist()
            (tmp_path / "sample.nii.gz").write_bytes(zf.read(names[0]))
        assert nib.load(tmp_path / "sample.nii.gz").shape == (16, 16, 1)

        # 6. no admin page
        driver.get(f"{base}/ui/admin/keys")
        assert "(403)" in driver.find_element(By.TAG_NAME, "h1").text
        # 7. sign out: the session is over
        driver.find_element(By.XPATH, "//button[text()='Sign out']").click()
        wait_until(lambda: driver.current_url.endswith("/ui/sign-in"), 30)
        driver.get(f"{base}/ui/jobs")
        assert driver.current_url.endswith("/ui/sign-in")

        # 8. another researcher in the same browser cannot open that dataset
        driver.find_element(By.ID, "api_key").send_keys(keys["bob"], Keys.ENTER)
        wait_until(lambda: driver.current_url.endswith("/ui/models"), 30)
        driver.get(dataset_url)
        assert "(404)" in driver.find_element(By.TAG_NAME, "h1").text


def test_an_administrator_makes_a_key_and_reads_the_audit_log_in_chromium(site, tmp_path: Path) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select

    base, keys, _ = site
    with chromium(tmp_path) as driver:
        driver.get(f"{base}/ui/sign-in")
        driver.find_element(By.ID, "api_key").send_keys(keys["admin"])
        driver.find_element(By.CSS_SELECTOR, "main button[type=submit]").click()
        driver.find_element(By.LINK_TEXT, "Keys").click()
        Select(driver.find_element(By.ID, "role")).select_by_value("researcher")
        driver.find_element(By.ID, "quota").send_keys("100")
        driver.find_element(By.XPATH, "//button[text()='Create key']").click()
        token = driver.find_element(By.ID, "new-key-value").text
        assert token.startswith("sck_")
        screenshot(driver, "admin-keys", tmp_path)
        assert httpx.get(f"{base}/v1/models", headers={"Authorization": f"Bearer {token}"}).status_code == 200
        driver.find_element(By.LINK_TEXT, "Audit log").click()
        driver.find_element(By.ID, "action").send_keys("key.")
        driver.find_element(By.XPATH, "//button[text()='Filter']").click()
        wait_until(lambda: "action=key." in driver.current_url, 30)
        rows = driver.find_elements(By.CSS_SELECTOR, "tbody tr")
        assert rows and all(r.find_elements(By.TAG_NAME, "td")[2].text.startswith("key.") for r in rows)
        screenshot(driver, "admin-audit", tmp_path)
