"""Pre-flight check of one manifest item, before any credit is spent. No Prefect.

Shared by the flow's `validate_item` task and `hailuo-batch validate`.
"""

from __future__ import annotations

from dataclasses import dataclass
from dataclasses import field as dc_field
from typing import Any

from pydantic import ValidationError

from hailuo_batch.apixo import GenerateInput, GenerateRequest
from hailuo_batch.images import ImageFetchError, ImageInfo, check_image_rules, inspect_image
from hailuo_batch.manifest import ManifestItem
from hailuo_batch.netguard import BlockedAddressError
from hailuo_batch.settings import Settings
from hailuo_batch.storage import OutputStore, StagingError, stage_image


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


def preflight(
    item: ManifestItem,
    *,
    settings: Settings,
    store: OutputStore | None = None,
    storage_options: dict[str, Any] | None = None,
) -> Preflight:
    """Check the image's bytes against the contract and build the (async) request.

    Callback mode is applied at submission, so the secret callback URL never sits in a
    validated request.

    With a `store`, s3:// and local images are staged and replaced by a presigned URL; without
    one (the `validate` command) nothing is written and the URL is checked as given.
    """
    try:
        info = inspect_image(item.image_url, settings=settings, storage_options=storage_options)
    except (ImageFetchError, BlockedAddressError) as exc:
        return Preflight(item, field="image_url", errors=[str(exc)])
    broken = check_image_rules(info, max_bytes=settings.max_image_bytes)
    if broken:
        return Preflight(item, image=info, field="image_url", errors=broken)
    url = item.image_url
    try:
        if store is not None:
            url = stage_image(item.image_url, store, settings=settings)
        elif not url.startswith(("http://", "https://")):
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
