"""The JavaScript client's own tests (``clients/js/test``), run by Node against a real broker."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest
import trio

JS_CLIENT = Path(__file__).resolve().parent.parent / "clients" / "js"


async def test_js_client_suite_passes_against_the_broker(broker_url: str) -> None:
    node = shutil.which("node")
    if node is None:
        pytest.skip("node is not installed: the JS client's tests need Node 20+")
    if not (JS_CLIENT / "node_modules").is_dir():
        pytest.fail("clients/js/node_modules is missing: run `make test` (it runs npm ci)")
    test_files = sorted(str(path) for path in (JS_CLIENT / "test").glob("*.test.js"))
    with trio.fail_after(120):
        result = await trio.run_process(
            [node, "--test", *test_files],
            cwd=JS_CLIENT,
            env={**os.environ, "BROKER_URL": broker_url},
            capture_stdout=True,
            stderr=subprocess.STDOUT,
            check=False,
        )
    output = result.stdout.decode(errors="replace")
    assert result.returncode == 0, f"node --test failed:\n{output}"
    assert "# fail 0" in output and "# skipped 0" in output, output
