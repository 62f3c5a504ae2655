"""docs/api.yaml documents exactly the routes khd serves."""

import re
from pathlib import Path

from kh.service.api import ID, ROUTES

DOC = Path(__file__).resolve().parents[2] / "docs" / "api.yaml"


def documented() -> set[tuple[str, str]]:
    out = set()
    path = None
    for line in DOC.read_text().splitlines():
        if m := re.match(r"^  (/v1/\S+):$", line):
            path = m[1]
        elif path and (m := re.match(r"^    (get|post|put|delete):", line)):
            out.add((m[1].upper(), path))
    return out


def served() -> set[tuple[str, str]]:
    out = set()
    for method, rx, _fn in ROUTES:
        names = iter(["{id}", "{node}", "{netid}"])
        path = rx
        while ID in path:
            seg = path.split(ID)[0].rstrip("/").rsplit("/", 1)[-1]
            name = {"allocations": "{id}", "nodes": "{node}", "domains": "{netid}",
                    "keys": "{id}"}.get(
                seg, next(names))
            path = path.replace(ID, name, 1)
        path = re.sub(r"\(\[[^)]*\)", "{name}", path)
        out.add((method, path))
    return out


def test_openapi_matches_routes():
    assert documented() == served()
