"""The catalog lock (``prompts/_catalog.lock``): each analysis type's version and content hash.

A result's meaning is fixed by its spec's content: the prompts, the JSON schema, the QA rules
(computed fields, confidences, pixel facts), sampling and the image variant. Customers rely on
``version`` to tell results of different content apart, so content must never change under the
same version. The lock records, per slug, the version and a sha256 of that content
(:func:`content_hash`); :func:`update_lock` refuses a catalog where a spec's hash changed while
its version did not, or where a version went down.

What the hash covers: the canonical JSON (sorted keys, compact) of the spec's ``model_dump``
with the system prompt the spec is sent with (its own or the catalog's shared one), minus what
only documents it: ``name``, ``description``, ``version`` itself, and the ``description`` of
each computed and log-probability entry. The JSON schema is hashed whole, its property
descriptions included: it is sent to the engine with every request.

The file is JSON (not YAML: the catalog loader reads every ``*.yaml`` but ``_catalog.yaml`` as
a spec), sorted by slug, and ships inside the package with the specs.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Collection
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

from goflow_gpu.errors import GoFlowError
from goflow_gpu.prompts.catalog import Catalog
from goflow_gpu.prompts.spec import PromptSpec

LOCK_FILE: Final = "_catalog.lock"
ABOUT: Final = (
    "Written by `goflow-gpu prompts lock`: per analysis type, its version and the sha256 of "
    "everything of its spec that shapes results. Do not edit by hand. When a spec's content "
    "changes, raise its version and add an entry to docs/ANALYSES-CHANGELOG.md."
)
#: Keys of a spec's dump that only document it (not hashed).
_DOC_KEYS: Final = ("name", "description", "version")


class LockError(GoFlowError):
    """A lock that cannot be written or read. ``problems`` holds one line per problem."""

    def __init__(self, problems: list[str]) -> None:
        super().__init__("\n".join(problems))
        self.problems = problems


@dataclass(frozen=True)
class Locked:
    """One slug's entry in the lock."""

    version: int
    sha256: str


@dataclass
class LockCheck:
    """How a catalog compares with its lock.

    ``refusals``: why, by slug, when content changed without a version bump or a version went
    down (the lock is not rewritten). ``changed``: slugs whose entry differs (new, re-versioned
    or removed); a lock is current when both are empty.
    """

    entries: dict[str, Locked]
    refusals: dict[str, str] = field(default_factory=dict)
    changed: list[str] = field(default_factory=list)

    @property
    def refused(self) -> list[str]:
        """One ``slug: why`` line per refusal."""
        return [f"{slug}: {why}" for slug, why in self.refusals.items()]

    @property
    def current(self) -> bool:
        return not self.refusals and not self.changed


def content_hash(spec: PromptSpec, system_prompt: str) -> str:
    """The sha256 of what in ``spec`` shapes results (see the module docstring)."""
    data: dict[str, Any] = spec.model_dump(mode="json")
    for key in _DOC_KEYS:
        data.pop(key, None)
    data["system_prompt"] = spec.system_prompt or system_prompt
    for section in ("computed", "logprob_confidence"):
        for entry in data["qa"].get(section, []):
            entry.pop("description", None)
    canonical = json.dumps(data, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()


def lock_entries(catalog: Catalog) -> dict[str, Locked]:
    """What the lock of ``catalog`` should hold, by slug."""
    return {
        slug: Locked(spec.version, content_hash(spec, catalog.system_prompt))
        for slug, spec in sorted(catalog.specs.items())
    }


def read_lock(path: Path) -> dict[str, Locked]:
    """The entries of a lock file; ``{}`` when there is none. Raises :class:`LockError`."""
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        return {
            slug: Locked(int(entry["version"]), str(entry["sha256"]))
            for slug, entry in data["specs"].items()
        }
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
        raise LockError([f"{path}: not a catalog lock ({exc}); delete it to start over"]) from exc


def render_lock(entries: dict[str, Locked]) -> str:
    """The text of a lock file holding ``entries``."""
    specs = {
        slug: {"version": entry.version, "sha256": entry.sha256}
        for slug, entry in sorted(entries.items())
    }
    return json.dumps({"about": ABOUT, "specs": specs}, indent=2, ensure_ascii=False) + "\n"


def check_lock(catalog: Catalog, locked: dict[str, Locked]) -> LockCheck:
    """Compare ``catalog`` with the ``locked`` entries."""
    entries = lock_entries(catalog)
    check = LockCheck(entries)
    for slug, entry in entries.items():
        old = locked.get(slug)
        if old is None:
            check.changed.append(slug)
        elif entry.version < old.version:
            check.refusals[slug] = (
                f"version {entry.version} is below the locked version {old.version}; "
                "versions only go up"
            )
        elif entry.sha256 != old.sha256 and entry.version == old.version:
            check.refusals[slug] = (
                f"the spec's content changed but its version is still {entry.version}; "
                f"raise `version` in {slug}.yaml and add an entry for it to "
                "docs/ANALYSES-CHANGELOG.md"
            )
        elif entry != old:
            check.changed.append(slug)
    check.changed.extend(sorted(set(locked) - set(entries)))
    return check


@dataclass
class LockAudit:
    """What ``prompts validate`` and ``prompts lock --check`` say about a catalog's lock.

    ``unusable``: the lock is missing where one is required, or cannot be read. ``refused``:
    why, by slug (:attr:`LockCheck.refusals`). ``stale``: by slug, entries the lock does not
    hold yet (a new spec, a raised version) or holds for a spec that is gone: `prompts lock`
    brings them in. ``changelog``: versions without a changelog entry (when one was given).
    """

    path: Path
    unusable: list[str] = field(default_factory=list)
    refused: dict[str, str] = field(default_factory=dict)
    stale: dict[str, str] = field(default_factory=dict)
    changelog: list[str] = field(default_factory=list)

    def problems(self) -> list[str]:
        """Every finding, one line each (``slug: ...`` for the per-spec ones)."""
        return [
            *self.unusable,
            *(f"{slug}: {why}" for slug, why in self.refused.items()),
            *self.changelog,
            *(f"{slug}: {why}" for slug, why in self.stale.items()),
        ]


def audit_lock(
    catalog: Catalog,
    path: Path | None = None,
    *,
    required: bool = True,
    changelog: Path | None = None,
    ignore: Collection[str] = (),
) -> LockAudit:
    """Compare ``catalog`` with its lock (default: ``_catalog.lock`` in its directory).

    ``required``: a missing lock is a problem (the shipped catalog); otherwise a catalog
    without a lock has nothing to check. ``ignore``: slugs to leave out (spec files that do not
    load, whose problems are reported on their own). The one comparison ``prompts validate``
    and ``prompts lock --check`` share.
    """
    path = path if path is not None else catalog.source / LOCK_FILE
    audit = LockAudit(path)
    if changelog is not None:
        audit.changelog = missing_changelog_entries(catalog, changelog)
    if not path.is_file():
        if required:
            audit.unusable.append(
                f"{path}:0: missing: the lock of versions and content hashes; run "
                "`goflow-gpu prompts lock`"
            )
        return audit
    try:
        locked = read_lock(path)
    except LockError as exc:
        audit.unusable.extend(exc.problems)
        return audit
    check = check_lock(catalog, locked)
    audit.refused = {slug: why for slug, why in check.refusals.items() if slug not in ignore}
    for slug in check.changed:
        if slug in ignore:
            continue
        old, new = locked.get(slug), check.entries.get(slug)
        if old is None:
            audit.stale[slug] = "not in the lock yet; run `goflow-gpu prompts lock`"
        elif new is None:
            audit.stale[slug] = "in the lock but not in the catalog; run `goflow-gpu prompts lock`"
        else:
            audit.stale[slug] = (
                f"version {new.version} is not locked yet (locked: {old.version}); run "
                "`goflow-gpu prompts lock`"
            )
    return audit


def update_lock(catalog: Catalog, path: Path | None = None, *, force: bool = False) -> LockCheck:
    """Rewrite the lock of ``catalog`` (default: ``_catalog.lock`` in its directory).

    Raises :class:`LockError` (and writes nothing) when a spec's content changed without a
    version bump or a version went down, unless ``force`` (for a version still in the making,
    never shipped: its content may change until it is released).
    """
    path = path if path is not None else catalog.source / LOCK_FILE
    check = check_lock(catalog, read_lock(path))
    if check.refused and not force:
        raise LockError(check.refused)
    if force and check.refusals:
        check.changed.extend(check.refusals)
    if check.changed or not path.is_file():
        path.write_text(render_lock(check.entries), encoding="utf-8")
    return check


# --- the changelog ---------------------------------------------------------------------------

_SLUG_HEADING = re.compile(r"^##\s+`?([a-z0-9][a-z0-9-]*)`?\s*$")
_VERSION_HEADING = re.compile(r"^###\s+[Vv]ersion\s+(\d+)\b")


def changelog_versions(text: str) -> set[tuple[str, int]]:
    """The ``(slug, version)`` pairs a changelog has entries for.

    Layout: a ``## <slug>`` heading per analysis type, a ``### Version <n>`` heading per version
    under it (anything after the number is free text, e.g. ``(catalog v2)``).
    """
    found: set[tuple[str, int]] = set()
    slug: str | None = None
    for line in text.splitlines():
        heading = _SLUG_HEADING.match(line)
        if heading:
            slug = heading.group(1)
            continue
        if line.startswith("## "):
            slug = None
            continue
        version = _VERSION_HEADING.match(line)
        if version and slug is not None:
            found.add((slug, int(version.group(1))))
    return found


def missing_changelog_entries(catalog: Catalog, changelog: Path) -> list[str]:
    """One line per spec whose current version has no entry in ``changelog``."""
    try:
        text = changelog.read_text(encoding="utf-8")
    except OSError as exc:
        return [f"{changelog}: cannot read the changelog: {exc}"]
    known = changelog_versions(text)
    return [
        f"{slug}: version {spec.version} has no entry in {changelog} (add '### Version "
        f"{spec.version}' under '## {slug}': what changed for customers)"
        for slug, spec in sorted(catalog.specs.items())
        if (slug, spec.version) not in known
    ]
