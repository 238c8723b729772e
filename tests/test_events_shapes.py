"""Event shapes are a contract: hooks, webhooks and old outbox rows rely on them.

``tests/data/events.json`` records, for every kind in ``tomd.events.EVENT_TYPES``
and every version it has had, the payload's field names and types in order
(as written in ``tomd/events.py``). A change to a kind's fields without a
version bump fails here, and so does the README's table of events (### Hooks)
naming other fields or versions. After bumping the version (and teaching
readers the old shape, if they must read old rows), record the new shape with::

    .venv/bin/python -m tests.test_events_shapes --update

which adds new kinds and versions and never rewrites a recorded version.
"""

from __future__ import annotations

import dataclasses
import json
import re
import sys
from pathlib import Path

from tomd.events import EVENT_TYPES

REPO = Path(__file__).resolve().parents[1]
SNAPSHOT = REPO / "tests" / "data" / "events.json"
README = REPO / "README.md"


def shape(cls) -> list[list[str]]:
    """[[field, type as written], ...] in payload order."""
    return [[f.name, str(f.type)] for f in dataclasses.fields(cls)]


def current() -> dict[str, dict]:
    return {kind: {"version": cls.version, "fields": shape(cls)} for kind, cls in EVENT_TYPES.items()}


def recorded() -> dict[str, dict[str, list]]:
    """{kind: {version (str): fields}}."""
    return json.loads(SNAPSHOT.read_text())


def check(now_by_kind: dict[str, dict], snap: dict[str, dict[str, list]]) -> list[str]:
    """What is wrong between the current shapes and the recorded ones (empty: nothing)."""
    problems = []
    for kind, now in now_by_kind.items():
        versions = snap.get(kind)
        if versions is None:
            problems.append(f"{kind}: a new kind, not in {SNAPSHOT.name}: record it with --update")
            continue
        was = versions.get(str(now["version"]))
        latest = max(versions, key=int)
        if was is None:
            problems.append(f"{kind}: version {now['version']} is not recorded: record it with --update")
        elif was != now["fields"]:
            problems.append(f"{kind}: the fields of version {now['version']} changed without a version bump: "
                            f"recorded {_fmt(was)}; now {_fmt(now['fields'])}")
        elif str(now["version"]) != latest:
            problems.append(f"{kind}: version {now['version']} is older than the recorded {latest}")
    return problems


def test_every_event_kind_matches_the_shape_recorded_for_its_version():
    problems = check(current(), recorded())
    assert not problems, "\n".join(problems)


def test_recorded_kinds_still_exist():
    gone = sorted(set(recorded()) - set(EVENT_TYPES))
    assert not gone, f"kinds removed from tomd.events (old outbox rows still carry them): {gone}"


def test_the_check_catches_an_unbumped_change_and_accepts_a_bump():
    snap = recorded()
    now = current()
    fields = now["target.created"]["fields"]
    renamed = {**now, "target.created": {"version": 1, "fields": [["id", "int"], *fields[1:]]}}
    (problem,) = check(renamed, snap)
    assert problem.startswith("target.created: the fields of version 1 changed without a version bump")
    retyped = {**now, "target.created": {"version": 1, "fields": [["target_id", "str"], *fields[1:]]}}
    assert len(check(retyped, snap)) == 1
    added = {**now, "target.created": {"version": 1, "fields": [*fields, ["extra", "str"]]}}
    assert len(check(added, snap)) == 1
    bumped = {**now, "target.created": {"version": 2, "fields": [*fields, ["extra", "str"]]}}
    assert check(bumped, snap) == ["target.created: version 2 is not recorded: record it with --update"]
    recorded_bump = {**snap, "target.created": {**snap["target.created"], "2": bumped["target.created"]["fields"]}}
    assert check(bumped, recorded_bump) == []
    assert check(now, recorded_bump) == ["target.created: version 1 is older than the recorded 2"]


def readme_rows() -> dict[str, tuple[int, list[str]]]:
    """The README's table of events (### Hooks): {kind: (version, [field, ...])}."""
    text = README.read_text()
    section = text[text.index("### Hooks"):text.index("### Notifications")]
    rows = {}
    for line in section.splitlines():
        m = re.match(r"\| `([a-z_.]+)` v(\d+) \|.*\| ((?:`\w+`(?:, )?)+) \|$", line)
        if m:
            rows[m.group(1)] = (int(m.group(2)), re.findall(r"`(\w+)`", m.group(3)))
    return rows


def test_the_readme_table_lists_every_kind_with_its_version_and_fields():
    rows = readme_rows()
    wrong = []
    for kind, cls in EVENT_TYPES.items():
        want = (cls.version, [f.name for f in dataclasses.fields(cls)])
        if rows.get(kind) != want:
            wrong.append(f"{kind}: README has {rows.get(kind)}, tomd/events.py {want}")
    wrong += [f"{kind}: in the README, not in tomd.events" for kind in sorted(set(rows) - set(EVENT_TYPES))]
    assert not wrong, "README.md, ### Hooks, the table of events:\n" + "\n".join(wrong)


# --------------------------------------------------------------- generating


def _fmt(fields: list) -> str:
    return ", ".join(f"{n}: {t}" for n, t in fields)


def update() -> list[str]:
    """Record new kinds and versions. Never rewrites a recorded version."""
    snap = recorded() if SNAPSHOT.exists() else {}
    said = []
    for kind, now in current().items():
        versions = snap.setdefault(kind, {})
        v = str(now["version"])
        if v in versions and versions[v] != now["fields"]:
            raise SystemExit(f"{kind}: version {v} is recorded with other fields: bump {EVENT_TYPES[kind].__name__}"
                             ".version instead of changing a published shape")
        if v not in versions:
            versions[v] = now["fields"]
            said.append(f"recorded {kind} v{v}")
    SNAPSHOT.parent.mkdir(parents=True, exist_ok=True)
    SNAPSHOT.write_text(_dump(snap))
    return said


def _dump(snap: dict) -> str:
    """One line per kind and version: reviewable diffs."""
    kinds = []
    for kind, versions in snap.items():
        vs = ",\n".join(f"    {json.dumps(v)}: {json.dumps(fields)}" for v, fields in versions.items())
        kinds.append(f"  {json.dumps(kind)}: {{\n{vs}\n  }}")
    return "{\n" + ",\n".join(kinds) + "\n}\n"


if __name__ == "__main__":
    if sys.argv[1:] != ["--update"]:
        raise SystemExit("usage: python -m tests.test_events_shapes --update")
    print("\n".join(update()) or "nothing to record")
