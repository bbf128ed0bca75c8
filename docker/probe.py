"""Health checks and waits of the Docker stack (standard library only; exit 0 = yes).

    probe.py http URL [--any-status]     URL answers 200 (or anything, with --any-status)
    probe.py seaweed MASTER_URL S3_URL   the S3 gateway answers and a volume server has room
    probe.py release SERVER_URL MODEL    MODEL has a release (token in DIFFCAST_TOKEN)

Every URL is expected on the loopback interface; no proxy from the environment is used.
"""

from __future__ import annotations

import json
import os
import sys
import urllib.error
import urllib.request

_LOCAL = urllib.request.build_opener(urllib.request.ProxyHandler({}))
TIMEOUT = 3.0


def _get(url: str, headers: dict[str, str] | None = None) -> tuple[int, bytes]:
    request = urllib.request.Request(url, headers=headers or {})
    try:
        with _LOCAL.open(request, timeout=TIMEOUT) as response:
            return int(response.status), response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, b""


def http_ok(url: str, any_status: bool = False) -> bool:
    try:
        status, _ = _get(url)
    except OSError:
        return False
    return any_status or status == 200


def seaweed_ready(master_url: str, s3_url: str) -> bool:
    if not http_ok(s3_url, any_status=True):  # S3 says 403 to an anonymous request
        return False
    try:
        status, body = _get(f"{master_url.rstrip('/')}/dir/status")
        topology = json.loads(body).get("Topology", {}) if status == 200 else {}
    except (OSError, ValueError, AttributeError):
        return False
    return bool(topology.get("Max", 0))


def has_release(server_url: str, model: str) -> bool:
    token = os.environ.get("DIFFCAST_TOKEN", "")
    try:
        status, body = _get(
            f"{server_url.rstrip('/')}/v1/releases?model={model}",
            {"Authorization": f"Bearer {token}"},
        )
        return status == 200 and bool(json.loads(body))
    except (OSError, ValueError):
        return False


def main(argv: list[str]) -> int:
    match argv:
        case ["http", url]:
            return 0 if http_ok(url) else 1
        case ["http", url, "--any-status"]:
            return 0 if http_ok(url, any_status=True) else 1
        case ["seaweed", master_url, s3_url]:
            return 0 if seaweed_ready(master_url, s3_url) else 1
        case ["release", server_url, model]:
            return 0 if has_release(server_url, model) else 1
        case _:
            print(__doc__, file=sys.stderr)
            return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
