"""Generated jobs: ids, manifest JSON and the media faults attached to a job's media."""

from __future__ import annotations

import random
import uuid
from dataclasses import dataclass, field
from typing import Any

from goflow_gpu.simulator.catalog import first_analyses, named

MEDIA_FAULTS: tuple[str, ...] = (
    "404",
    "html",
    "truncated",
    "corrupt",
    "bomb",
    "oversized",
    "slow",
    "redirect-loop",
)
"""What a media item can do wrong when downloaded (both variants):

``404`` not found; ``html`` a 200 login page; ``truncated`` the connection is cut half-way
through a body whose Content-Length announced it whole; ``corrupt`` a JPEG-looking body of noise;
``bomb`` a tiny PNG of 20000x20000 pixels; ``oversized`` ~40 MB typed image/jpeg; ``slow``
answers only after the media route's ``slow_seconds``; ``redirect-loop`` redirects forever.
"""


@dataclass
class SimJob:
    """One queued or served job as the simulator knows it."""

    manifest: dict[str, Any]
    media_faults: dict[str, str] = field(default_factory=dict)  # media id -> fault
    scenes: bool = False
    """Scene mode: the media are labelled scenes served as PNG (``.png`` URLs), to be graded."""

    @property
    def suffix(self) -> str:
        """The file suffix of this job's media URLs (``.png`` for scenes, else ``.jpg``)."""
        return ".png" if self.scenes else ".jpg"

    @property
    def project_id(self) -> str:
        return str(self.manifest["project"]["id"])

    @property
    def media_ids(self) -> set[str]:
        return {str(m["id"]) for m in self.manifest["media"]}

    @property
    def analysis_ids(self) -> set[str]:
        return {str(a["id"]) for a in self.manifest["analyses"]}


def new_id(rng: random.Random) -> str:
    """A version-4 UUID drawn from ``rng`` (reproducible under a seed)."""
    return str(uuid.UUID(int=rng.getrandbits(128), version=4))


def build_job(
    rng: random.Random,
    *,
    number: int,
    client: dict[str, str],
    base_url: str,
    media: int,
    analyses: int,
    slugs: list[str] | None,
    media_faults: dict[int, str] | None,
    scenes: bool = False,
) -> SimJob:
    """Generate job ``number`` with fresh ids; media URLs point at ``base_url``.

    ``scenes`` names the media ``.png`` (URLs and filenames), as the lossless scenes are served.
    """
    if media < 1:
        raise ValueError(f"a job needs at least one media item, got media={media}")
    kinds = named(slugs) if slugs is not None else first_analyses(analyses)
    project_id = new_id(rng)
    suffix = ".png" if scenes else ".jpg"
    items = []
    for index in range(media):
        media_id = new_id(rng)
        root = f"{base_url}/media/{project_id}/{media_id}"
        items.append(
            {
                "id": media_id,
                "filename": f"image-{index + 1:02d}{suffix}",
                "optimised_path": f"{root}/optimised{suffix}",
                "greyscale_path": f"{root}/greyscale{suffix}",
            }
        )
    faults: dict[str, str] = {}
    for index, fault in (media_faults or {}).items():
        if fault not in MEDIA_FAULTS:
            raise ValueError(
                f"unknown media fault {fault!r}; choose from {', '.join(MEDIA_FAULTS)}"
            )
        if not 0 <= index < media:
            raise ValueError(f"media fault index {index} is outside this job's {media} media")
        faults[items[index]["id"]] = fault
    manifest = {
        "client": dict(client),
        "project": {
            "id": project_id,
            "slug": f"sim-project-{number}",
            "name": f"Simulated Project {number}",
        },
        "media": items,
        "analyses": [{"id": new_id(rng), "name": name, "slug": slug} for slug, name in kinds],
    }
    return SimJob(manifest=manifest, media_faults=faults, scenes=scenes)
