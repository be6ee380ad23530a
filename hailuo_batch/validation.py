"""Pre-flight check of one manifest item, before any credit is spent. No Prefect.

Shared by the flow's `validate_item` task and `hailuo-batch validate`, so both give the same
verdict for the same item and output. `preflight` never raises: every problem with an item,
expected or not, becomes a `Preflight` with the field and the reasons.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from dataclasses import field as dc_field
from typing import Any

from pydantic import ValidationError

from hailuo_batch.apixo import GenerateInput, GenerateRequest
from hailuo_batch.images import ImageFetchError, ImageInfo, check_image_rules, inspect_image
from hailuo_batch.manifest import ManifestItem
from hailuo_batch.netguard import BlockedAddressError, ImageUrlError, image_url_kind
from hailuo_batch.settings import Settings
from hailuo_batch.storage import OutputStore, StagingError, stage_image

logger = logging.getLogger(__name__)


@dataclass
class Preflight:
    """The verdict on one item: a ready request, or the field and every rule it broke."""

    item: ManifestItem
    request: GenerateRequest | None = None
    image: ImageInfo | None = None
    field: str | None = None
    errors: list[str] = dc_field(default_factory=list)

    @property
    def ok(self) -> bool:
        return self.request is not None


def local_image_problem(image_url: str, *, output_is_local: bool | None) -> str | None:
    """Why a local image path cannot be handed to the provider with this output, or None.

    A local image is uploaded to the output and presigned; a local output folder cannot hand
    out URLs. `output_is_local` None means the output is not known (nothing to say yet).
    """
    if not output_is_local:
        return None
    try:
        if image_url_kind(image_url) != "local":
            return None
    except ImageUrlError:
        return None
    return (
        f"cannot give the provider the local image {image_url}: with a local output there is "
        "nowhere to upload it. Use an s3:// output (local images are uploaded and presigned), "
        "or serve the images over http(s) and put those URLs in the manifest"
    )


def preflight(
    item: ManifestItem,
    *,
    settings: Settings,
    store: OutputStore | None = None,
    storage_options: dict[str, Any] | None = None,
    output_is_local: bool | None = None,
) -> Preflight:
    """Check the image's bytes against the contract and build the (async) request.

    Callback mode is applied at submission, so the secret callback URL never sits in a
    validated request.

    The image URL's form is checked first, without I/O: only http(s)://, s3:// and plain local
    paths go further, so staging never sees anything else. A local image with a local output
    is refused here too (before reading it), with a `store` (the run) as without one (the
    `validate` command, which passes `output_is_local`), so both give the same verdict.

    With a `store`, s3:// and local images are staged and replaced by a presigned URL; without
    one nothing is written and the URL is checked as given. Never raises.
    """
    try:
        return _preflight(
            item,
            settings=settings,
            store=store,
            storage_options=storage_options,
            output_is_local=store.is_local if store is not None else output_is_local,
        )
    except Exception as exc:  # a per-item problem must never abort the run
        logger.exception("unexpected error while checking item %s", item.id)
        return Preflight(
            item,
            field="image_url",
            errors=[f"the item could not be checked ({type(exc).__name__}); it was not submitted"],
        )


def _preflight(
    item: ManifestItem,
    *,
    settings: Settings,
    store: OutputStore | None,
    storage_options: dict[str, Any] | None,
    output_is_local: bool | None,
) -> Preflight:
    try:
        kind = image_url_kind(item.image_url)
    except ImageUrlError as exc:
        return Preflight(item, field="image_url", errors=[str(exc)])
    problem = local_image_problem(item.image_url, output_is_local=output_is_local)
    if problem:
        return Preflight(item, field="image_url", errors=[problem])
    try:
        info = inspect_image(item.image_url, settings=settings, storage_options=storage_options)
    except (ImageFetchError, BlockedAddressError, ImageUrlError) as exc:
        return Preflight(item, field="image_url", errors=[str(exc)])
    broken = check_image_rules(info, max_bytes=settings.max_image_bytes)
    if broken:
        return Preflight(item, image=info, field="image_url", errors=broken)
    url = item.image_url
    try:
        if store is not None:
            url = stage_image(item.image_url, store, settings=settings)
        elif kind != "http":
            url = "https://staged.invalid/" + item.id  # placeholder: staging happens at run time
        request = GenerateRequest(
            provider=item.provider,
            input=GenerateInput(
                mode=item.mode, prompt=item.prompt, image_urls=[url], duration=item.duration
            ),
        )
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first.get("loc", ())) or "request"
        return Preflight(item, image=info, field=where, errors=[e["msg"] for e in exc.errors()])
    except (StagingError, ValueError, OSError) as exc:
        return Preflight(item, image=info, field="image_url", errors=[str(exc)])
    return Preflight(item, request=request, image=info)
