"""What every answer of every endpoint means: the one table the worker acts on.

The client maps an HTTP answer to an exception of :mod:`goflow_gpu.errors`; the job decides what
to do with it through :func:`decide`, which reads :data:`TABLE`. docs/RELIABILITY.md shows the
same table (generated from :func:`table_rows`, a test keeps them equal), and a parametrised test
walks every status 400-599 on the four endpoints.

The rules, in words:

- **2xx**: done.
- **401/403**, any endpoint: the key is refused; the worker stops with the auth exit code and
  keeps its state (a security event, never retried).
- **408, 425, 429, 5xx**, and network errors or timeouts: transient. The client retries a few
  times; what outlasts that pauses the *job* with job-level backoff (:mod:`goflow_gpu.patience`)
  and nothing becomes terminal.
- **result**: a duplicate answer (a 409, or a 400 whose detail speaks of a duplicate, see
  :func:`speaks_of_duplicate`) after an attempt whose outcome is unknown means the earlier
  attempt landed: *reported*. Any other 4xx (404 included) refuses this one combination: it is
  kept as *rejected* with the server's detail (logs, metrics, report) and the job goes on.
- **status / report**: a 409, or a 400 that speaks of a duplicate, means the backend already has
  it: counted as sent. Any other 4xx (404 included: an unknown project is as likely a deploy's
  misrouting as a deleted project, and closing the job would be irreversible) parks the job as
  *needs-attention* with the server's detail; the worker moves on to the next job and never
  re-sends it by itself (``goflow-gpu state retry`` re-arms it, ``state abandon`` closes it).
- **next-job**: 404 is "no job now"; any other 4xx is polled again later with backoff, like an
  outage (the backend's trouble, not the worker's).
- Any other answer outside the contract (1xx, 3xx) is treated like the 4xx of its endpoint.
"""

from __future__ import annotations

import re
from enum import StrEnum
from typing import Final, Literal

__all__ = [
    "ENDPOINTS",
    "TABLE",
    "Decision",
    "decide",
    "is_transient_status",
    "speaks_of_duplicate",
    "table_rows",
]

Endpoint = Literal["next-job", "status", "result", "report"]
ENDPOINTS: Final[tuple[Endpoint, ...]] = ("next-job", "status", "result", "report")


class Decision(StrEnum):
    """What the worker does with one answer."""

    OK = "ok"  # the call succeeded
    TRANSIENT = "transient"  # retry; past the client's retries, pause the job (never terminal)
    AUTH = "auth"  # stop the worker with the auth exit code, state kept
    NO_JOB = "no-job"  # next-job: nothing to do now
    POLL_LATER = "poll-later"  # next-job: an unexpected refusal; poll again with backoff
    LANDED = "landed"  # the backend already has it (duplicate after an unknown outcome / 409)
    REFUSED = "refused"  # result: this combination is refused; kept visible, the job goes on
    PARK = "park"  # status/report: park the job as needs-attention, move on


TRANSIENT_STATUSES: Final = frozenset({408, 425, 429})


def is_transient_status(status: int) -> bool:
    """408, 425, 429 and every 5xx: an answer that may go away (the backend and image hosts)."""
    return status in TRANSIENT_STATUSES or status >= 500


#: (endpoint, answer class) -> decision; "duplicate" is a 409 or a 400 that speaks of one,
#: "duplicate-first" the same answer when no earlier attempt of the call may have landed.
TABLE: Final[dict[tuple[Endpoint, str], Decision]] = {
    **{(e, "2xx"): Decision.OK for e in ENDPOINTS},
    **{(e, "401/403"): Decision.AUTH for e in ENDPOINTS},
    **{(e, "408/425/429/5xx"): Decision.TRANSIENT for e in ENDPOINTS},
    ("next-job", "404"): Decision.NO_JOB,
    ("next-job", "duplicate"): Decision.POLL_LATER,
    ("next-job", "duplicate-first"): Decision.POLL_LATER,
    ("next-job", "other 4xx"): Decision.POLL_LATER,
    ("result", "404"): Decision.REFUSED,
    ("result", "duplicate"): Decision.LANDED,
    ("result", "duplicate-first"): Decision.REFUSED,
    ("result", "other 4xx"): Decision.REFUSED,
    **{(e, "404"): Decision.PARK for e in ("status", "report")},
    **{(e, "duplicate"): Decision.LANDED for e in ("status", "report")},
    **{(e, "duplicate-first"): Decision.LANDED for e in ("status", "report")},
    **{(e, "other 4xx"): Decision.PARK for e in ("status", "report")},
}

_ANSWER_CLASSES: Final = (
    "2xx",
    "401/403",
    "408/425/429/5xx",
    "404",
    "duplicate",
    "duplicate-first",
    "other 4xx",
)

# Words that say "this exists already", next to "already" or "previously" in any order.
_ALREADY_WORDS: Final = frozenset(
    {
        "submitted",
        "recorded",
        "reported",
        "present",
        "exists",
        "exist",
        "existing",
        "stored",
        "received",
        "posted",
        "sent",
        "processed",
        "saved",
        "registered",
        "known",
        "created",
        "completed",
        "uploaded",
    }
)
_THINGS: Final = frozenset({"result", "submission", "analysis", "record", "entry", "status"})
# Words of a validation error or a denial: a detail with any of them is not "it is there".
_NOT_A_DUPLICATE: Final = frozenset(
    {
        "not",
        "no",
        "never",
        "without",
        "doesn't",
        "isn't",
        "wasn't",
        "nonexistent",
        "invalid",
        "must",
        "contains",
        "contain",
        "values",
        "value",
        "field",
        "fields",
        "ids",
        "keys",
        "items",
        "format",
        "required",
        "expected",
        "missing",
        "progress",
    }
)
_TOKEN = re.compile(r"[a-z0-9']+")


def speaks_of_duplicate(detail: str | None) -> bool:
    """Whether a server's detail says the thing was submitted already, in any phrasing.

    Matches, case-insensitively and in any word order: a word starting with ``duplicat``
    ("duplicate", "duplicated"); or ``already`` / ``previously`` together with a word that says
    it is there (submitted, recorded, reported, present, exists, existing, stored, received,
    posted, sent, processed, saved, registered, known, created, completed, uploaded); or
    "exists"/"existing" said of a result, submission, analysis, record, entry or status.
    Underscores separate words (``RESULT_ALREADY_EXISTS`` matches).

    Never a match when the detail also has a word of a validation error or a denial (not, no,
    never, without, invalid, must, contains, values, field(s), ids, keys, items, format,
    required, expected, missing, ...): "contains duplicate values", "must reference an existing
    analysis" and "not a duplicate" are refusals, and taking a refusal for "it landed" would lose
    the thing silently. Limits: a detail in another language does not match (a result is then
    *refused*: visible, never silently lost); a duplicate message that also uses one of those
    words is taken for a refusal (visible, the safe side). For results the rule is only
    consulted after an attempt whose outcome is unknown.
    """
    if not detail:
        return False
    words = _TOKEN.findall(detail.lower())
    tokens = set(words)
    if tokens & _NOT_A_DUPLICATE:
        return False
    if any(word.startswith("duplicat") for word in words):
        return True
    if tokens & {"already", "previously"} and tokens & _ALREADY_WORDS:
        return True
    return bool(tokens & {"exists", "existing"} and tokens & _THINGS)


def answer_class(status: int, detail: str | None) -> str:
    """The column of :data:`TABLE` an HTTP status (and its detail) falls in.

    ``duplicate`` is returned for a 409 or a duplicate-speaking 400; :func:`decide` narrows it
    to ``duplicate-first`` when no earlier attempt may have landed.
    """
    if 200 <= status < 300:
        return "2xx"
    if status in (401, 403):
        return "401/403"
    if is_transient_status(status):
        return "408/425/429/5xx"
    if status == 404:
        return "404"
    if status == 409 or (status == 400 and speaks_of_duplicate(detail)):
        return "duplicate"
    return "other 4xx"


def decide(
    endpoint: Endpoint, status: int | None, detail: str | None = None, *, prior_unknown: bool
) -> Decision:
    """The decision for one answer. ``status`` None is a network error or a timeout.

    ``prior_unknown`` is true when an earlier attempt of the same call may have reached the
    server (a timeout, a dropped connection, a 5xx, or a crash after the intent was recorded).
    """
    if status is None:
        return Decision.TRANSIENT
    column = answer_class(status, detail)
    if column == "duplicate" and not prior_unknown:
        column = "duplicate-first"
    return TABLE[(endpoint, column)]


def table_rows() -> list[tuple[str, ...]]:
    """The table as rows: answer, then the decision for each endpoint (for docs and tests)."""
    return [
        (column, *(TABLE[(endpoint, column)].value for endpoint in ENDPOINTS))
        for column in _ANSWER_CLASSES
    ]
