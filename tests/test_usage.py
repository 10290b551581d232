"""`kleinserve usage`: per-key sums of the succeeded jobs' usage, on a data dir filled by a real server
(a `kleinserve serve --lora-dir` subprocess with three keys), and the images per LoRA adapter."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from kleinserve.api.auth import DATABASE_NAME, SqliteKeyStore
from kleinserve.cli import main
from kleinserve.jobs.report import USAGE_COLUMNS
from tests.api.test_loras import write_adapter
from tests.test_crash import ServerProcess, wait_for

SIDE = 256
MP = SIDE * SIDE / 1e6


def _table(text: str) -> dict[str, dict[str, float]]:
    lines = text.strip().splitlines()
    header = lines[0].split("  ")
    titles = ["key", *(title for _, title in USAGE_COLUMNS)]
    assert [cell.strip() for cell in header if cell.strip()] == titles
    rows = {}
    for line in lines[1:]:
        key, *cells = line.split()
        rows[key] = {name: float(cell) for (name, _), cell in zip(USAGE_COLUMNS, cells, strict=True)}
    return rows


@pytest.fixture(scope="module")
def filled_data_dir(tmp_path_factory: pytest.TempPathFactory, tiny_dir: Path) -> Iterator[Path]:
    """alice: one OpenAI job of 2 images and one BFL job with the adapters fox and owl; bob: one BFL job;
    carol: a cancelled job."""
    data_dir = tmp_path_factory.mktemp("usage") / "data"
    loras = tmp_path_factory.mktemp("usage-loras")
    write_adapter(tiny_dir, loras / "fox.safetensors", seed=0)
    write_adapter(tiny_dir, loras / "owl.safetensors", seed=1)
    keys = SqliteKeyStore(data_dir / DATABASE_NAME)
    secrets = {name: keys.create(name) for name in ("alice", "bob", "carol")}
    keys.close()
    server = ServerProcess(tiny_dir, data_dir, ("--lora-dir", str(loras)))
    try:
        server.start()
        _fill(server, secrets)
    finally:
        server.stop()
    yield data_dir


def _fill(server: ServerProcess, secrets: dict[str, str]) -> None:
    with httpx.Client(base_url=server.base_url, timeout=30) as client:

        def headers(name: str) -> dict[str, str]:
            return {"Authorization": f"Bearer {secrets[name]}"}

        generated = client.post(
            "/v1/images/generations",
            json={"model": "flux-2-klein-4b", "prompt": "two cats", "size": f"{SIDE}x{SIDE}", "n": 2},
            headers=headers("alice"),
        )
        assert generated.status_code == 200, generated.text
        bfl = {"prompt": "a boat", "width": SIDE, "height": SIDE, "seed": 1}
        adapted = {**bfl, "loras": [{"name": "fox"}, {"name": "owl", "scale": 0.5}]}
        submitted = [
            client.post("/v1/flux-2-klein-4b", json=body, headers=headers(name)).json()["id"]
            for body, name in ((adapted, "alice"), (bfl, "bob"))
        ]
        for job_id, name in zip(submitted, ("alice", "bob"), strict=True):
            wait_for(
                lambda j=job_id, n=name: (
                    client.get(f"/v1/jobs/{j}", headers=headers(n)).json()["status"] == "succeeded"
                ),
                20,
                "a BFL job",
            )
        # carol's job never succeeds: it is cancelled while queued behind a large one of hers.
        big = {"prompt": "a mountain", "width": 1024, "height": 1024, "seed": 2}
        client.post("/v1/flux-2-klein-4b", json=big, headers=headers("carol"))
        small = client.post("/v1/flux-2-klein-4b", json=bfl, headers=headers("carol")).json()["id"]
        cancelled = client.post(f"/v1/jobs/{small}/cancel", headers=headers("carol")).json()
        assert cancelled["status"] == "cancelled"


def test_usage_sums_succeeded_jobs_per_key(filled_data_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["usage", "--data-dir", str(filled_data_dir)]) == 0
    rows = _table(capsys.readouterr().out)
    alice, bob = rows["alice"], rows["bob"]
    assert (alice["jobs"], alice["images"], alice["tiles_out"], alice["tiles_in"]) == (2, 3, 3, 0)
    assert (bob["jobs"], bob["images"], bob["tiles_out"]) == (1, 1, 1)
    assert alice["megapixels_out"] == pytest.approx(3 * MP, abs=2e-4)
    assert bob["megapixels_out"] == pytest.approx(MP, abs=1e-4)
    assert alice["megapixels_in"] == bob["megapixels_in"] == 0
    assert alice["steps"] == 2 * bob["steps"] > 0
    assert alice["engine_seconds"] > 0 and bob["engine_seconds"] > 0
    assert (alice["adapter_images"], bob["adapter_images"]) == (2, 0)  # one image, two adapters
    assert "carol" not in rows or rows["carol"]["jobs"] <= 1  # her cancelled job is never counted
    assert rows["total"]["images"] == sum(row["images"] for key, row in rows.items() if key != "total")


def test_usage_of_one_key_and_since(filled_data_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["usage", "--key", "bob", "--data-dir", str(filled_data_dir)]) == 0
    rows = _table(capsys.readouterr().out)
    assert list(rows) == ["bob"] and rows["bob"]["jobs"] == 1

    today = time.strftime("%Y-%m-%d")
    assert main(["usage", "--key", "alice", "--since", today, "--data-dir", str(filled_data_dir)]) == 0
    assert _table(capsys.readouterr().out)["alice"]["jobs"] == 2

    tomorrow = time.strftime("%Y-%m-%d", time.localtime(time.time() + 86400))
    assert main(["usage", "--since", tomorrow, "--data-dir", str(filled_data_dir)]) == 0
    captured = capsys.readouterr()
    assert _table(captured.out) == {}
    assert "no succeeded jobs" in captured.err


def test_usage_by_adapter(filled_data_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["usage", "--by-adapter", "--data-dir", str(filled_data_dir)]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[0].split() == ["key", "adapter", "jobs", "images"]
    assert [line.split() for line in lines[1:]] == [["alice", "fox", "1", "1"], ["alice", "owl", "1", "1"]]


def test_usage_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["usage", "--data-dir", str(tmp_path / "nothing")]) == 2
    assert "no job database" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["usage", "--since", "yesterday"])
