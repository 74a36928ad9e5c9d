"""The gateway's error catalogue: every code the data plane can send is in it, with the
status it is sent with, and documented; every response is an RFC 9457 problem."""

from __future__ import annotations

import json
import re
from pathlib import Path

from meshgate.gateway.errors import PROBLEM_TYPE, PROBLEMS
from tests.helpers import Client, RawUpstream, gateway_yaml, run_gateway

ROOT = Path(__file__).resolve().parents[2]
SENT = re.compile(r'\b([1-5]\d\d),\s*"([a-z][a-z_]+)"')


def sent_codes() -> set[tuple[int, str]]:
    """(status, code) pairs written in the data plane's source (the admin API, on
    the control plane, answers with its own codes, documented with it)."""
    pairs = set()
    for path in (ROOT / "src/meshgate/gateway").rglob("*.py"):
        if path.name in ("errors.py", "admin.py"):
            continue
        pairs |= {(int(s), c) for s, c in SENT.findall(path.read_text())}
    return pairs


def test_every_code_sent_is_in_the_catalogue_with_its_status() -> None:
    pairs = sent_codes()
    assert len(pairs) > 30  # the scan found the call sites
    wrong = sorted((s, c) for s, c in pairs if c not in PROBLEMS or PROBLEMS[c].status != s)
    assert wrong == []
    unused = sorted(set(PROBLEMS) - {c for _, c in pairs})
    assert unused == []


def test_every_code_is_documented_with_its_status() -> None:
    docs = (ROOT / "docs/gateway.md").read_text()
    section = docs[docs.index("## Errors") : docs.index("## Upstream pools")]
    rows = {}
    for status, codes in re.findall(r"^\| (\d{3}) \| ([^|]+) \|", section, re.MULTILINE):
        for code in re.findall(r"`([a-z_]+)`", codes):
            rows[code] = int(status)
    missing = sorted(c for c in PROBLEMS if rows.get(c) != PROBLEMS[c].status)
    assert missing == []


async def test_an_error_is_a_problem_document() -> None:
    up = await RawUpstream().start()
    route = "  - {name: api, upstream: up, match: {path_prefix: /api}}\n"
    async with run_gateway(gateway_yaml({"up": [up.address]}, route)) as (_, port):
        client = await Client.connect(port)
        res = await client.request("GET", "/nothing/here?api_key=secret")
        assert res.status == 404
        assert res.header("Content-Type") == "application/problem+json"
        body = json.loads(res.body)
        assert body == {
            "type": PROBLEM_TYPE + "no_route",
            "title": "No route matches",
            "status": 404,
            "detail": "no route matches GET /nothing/here",
            "instance": "/nothing/here",
            "error": "no_route",
            "request_id": res.header("X-Request-ID"),
        }
        res = await client.request("GET", "/api/x")
        assert res.status == 200
