"""Stable Prefect artifact keys: one key per deployment or per manifest, never per run. No Prefect.

A keyed artifact keeps its history under one key, so the Artifacts page shows the nightly
batch's table growing night after night instead of two new keys every run.
"""

from __future__ import annotations

import re

#: Prefect artifact keys: lowercase letters, digits and dashes
_NOT_KEY = re.compile(r"[^a-z0-9]+")
#: room for the `items-` / `summary-` prefix in a short, readable key
MAX_SLUG = 60


def slugify(text: str, fallback: str = "manifest") -> str:
    """`text` as lowercase letters, digits and single dashes (at most MAX_SLUG characters);
    `fallback` when nothing of it is left."""
    slug = _NOT_KEY.sub("-", text.lower()).strip("-")[:MAX_SLUG].rstrip("-")
    return slug or fallback


def manifest_stem(manifest: str) -> str:
    """The manifest's file name without its extension: `s3://b/in/night.csv?x=1` -> `night`."""
    name = manifest.split("?", 1)[0].rstrip("/").rsplit("/", 1)[-1]
    stem, dot, _ = name.rpartition(".")
    return stem if dot and stem else name


def report_slug(deployment: str | None, manifest: str) -> str:
    """The deployment's name when the run has one, else the manifest file's stem, slugified."""
    if deployment and slugify(deployment, fallback=""):
        return slugify(deployment)
    return slugify(manifest_stem(manifest))


def report_keys(deployment: str | None, manifest: str) -> tuple[str, str]:
    """The keys of a run's item table and summary artifacts: `items-<slug>`, `summary-<slug>`."""
    slug = report_slug(deployment, manifest)
    return f"items-{slug}", f"summary-{slug}"
