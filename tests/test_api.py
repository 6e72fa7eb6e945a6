"""The REST service on a real uvicorn (127.0.0.1) with a tiny trained model: health, auth, model cards."""

import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory):
    root = tmp_path_factory.mktemp("service")
    models = root / "models"
    models.mkdir()
    shutil.copytree(tiny_model, models / "demo")
    plain = models / "plain"
    shutil.copytree(tiny_model, plain)
    card = json.loads((plain / "model_card.json").read_text())
    card.update(dp=False, epsilon=None)
    (plain / "model_card.json").write_text(json.dumps(card))
    env = {**os.environ, "SYNTHCOHORT_DATA_DIR": str(root / "data")}
    key = subprocess.run(
        [sys.executable, "-m", "app.cli", "keys", "create", "--role", "researcher"],
        capture_output=True,
        text=True,
        env=env,
        check=True,
    ).stdout.strip()
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "app.cli", "serve", "--models", str(models), "--port", str(port)],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    base = f"http://127.0.0.1:{port}"
    deadline = time.time() + 120
    while time.time() < deadline:
        try:
            if httpx.get(f"{base}/healthz", timeout=1).status_code == 200:
                break
        except httpx.HTTPError:
            time.sleep(0.2)
    else:
        proc.kill()
        pytest.fail(f"server did not start: {proc.stderr.read()}")
    yield base, key
    proc.terminate()
    proc.wait(timeout=30)


def test_health_and_readiness(server) -> None:
    base, _ = server
    assert httpx.get(f"{base}/healthz").json() == {"status": "ok", "models": None}
    ready = httpx.get(f"{base}/readyz")
    assert ready.status_code == 200 and ready.json()["models"] == 1


def test_model_cards_need_a_key_and_hide_private_fields(server, tiny_model: Path) -> None:
    base, key = server
    assert httpx.get(f"{base}/v1/models").status_code == 401
    assert httpx.get(f"{base}/v1/models", headers={"Authorization": "Bearer sck_x_y"}).status_code == 401
    headers = {"Authorization": f"Bearer {key}"}
    listed = httpx.get(f"{base}/v1/models", headers=headers)
    assert listed.status_code == 200
    assert [m["id"] for m in listed.json()] == ["demo"]  # the dp:false model is not served without the flag
    card = httpx.get(f"{base}/v1/models/demo", headers=headers).json()
    expected = json.loads((tiny_model / "model_card.json").read_text())
    assert card["epsilon"] == expected["epsilon"] and card["privacy_unit"] == "patient" and card["private"]
    assert card["memorization_filter"]["quantile"] == 0.05
    body = json.dumps(card)
    assert "threshold" not in body and "store_fingerprint" not in body and str(tiny_model) not in body
    missing = httpx.get(f"{base}/v1/models/nope", headers=headers)
    assert missing.status_code == 404 and "available" in missing.json()["detail"]
    assert httpx.get(f"{base}/v1/models/..%2Fdemo", headers=headers).status_code == 404


def test_openapi_documents_the_schemas(server) -> None:
    base, _ = server
    spec = httpx.get(f"{base}/openapi.json").json()
    assert "/v1/models/{model_id}" in spec["paths"]
    assert "ModelCard" in spec["components"]["schemas"]
