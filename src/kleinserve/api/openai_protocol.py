"""The OpenAI Images API's request as kleinserve takes it: OpenAI's fields plus the klein extensions that
hosted klein endpoints accept (wire-formats.md sections 2-3). Wire models and limits only; api/openai.py
translates.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from kleinserve.api._dialect import MAX_PROMPT_CHARS, parse_model
from kleinserve.types import MAX_SEED, ImageFormat

MAX_AREA = 1024 * 1024
DEFAULT_COMPRESSION = 100  # OpenAI's default for output_compression (jpeg/webp quality)
# Multipart text fields may carry data-URL references as large as in JSON bodies (starlette's default limit
# is 1 MiB); the whole body stays capped by app.BodyLimit.
MAX_TEXT_FIELD_BYTES = 32 * 1024 * 1024
ASPECT_RATIOS = {  # about one megapixel each, sides multiples of 16
    "1:1": (1024, 1024),
    "16:9": (1344, 768),
    "9:16": (768, 1344),
    "4:3": (1152, 864),
    "3:4": (864, 1152),
    "3:2": (1248, 832),
    "2:3": (832, 1248),
}


class ImageRequest(BaseModel):
    """Body of /v1/images/generations; the same fields as multipart text fields on /v1/images/edits."""

    model_config = ConfigDict(extra="allow")

    prompt: str = Field(min_length=1, max_length=MAX_PROMPT_CHARS)
    model: str | None = None
    n: int | None = Field(None, ge=1, le=4, description="number of images; seeds seed, seed+1, ...")
    num_images: int | None = Field(None, ge=1, le=4, description="alias of n")
    size: str | None = Field(
        None,
        description='"WxH" (256-2048 px per side, width*height <= 1048576) or "auto"',
        examples=["1024x768"],
    )
    aspect_ratio: Literal["1:1", "16:9", "9:16", "4:3", "3:4", "3:2", "2:3"] | None = None
    width: int | None = Field(None, ge=256, le=2048, description="with height; width*height <= 1048576")
    height: int | None = Field(None, ge=256, le=2048, description="with width; width*height <= 1048576")
    num_inference_steps: int | None = Field(None, ge=1, le=12, description="default 4")
    guidance_scale: float | None = Field(None, ge=0, le=8, description="used only by variants with CFG")
    seed: int | None = Field(None, ge=0, le=MAX_SEED)
    negative_prompt: str | None = Field(None, max_length=MAX_PROMPT_CHARS)
    output_format: Literal["png", "jpeg", "jpg", "webp"] | None = None
    format: Literal["png", "jpeg", "jpg", "webp"] | None = Field(None, description="alias of output_format")
    output_compression: int | None = Field(None, ge=0, le=100, description="jpeg/webp quality, default 100")
    response_format: Literal["url", "b64_json"] | None = Field(None, description="default b64_json")
    return_base64: bool | None = None
    max_sequence_length: int | None = Field(
        None, ge=64, le=512, description="prompt tokens (default: the model's)"
    )
    images: list[str] | None = Field(
        None, max_length=4, description="reference images: URLs, data URLs, base64"
    )
    image: str | None = Field(
        None, description="generations: the image edited (URL, data URL, base64); edits take it as a file"
    )
    mask: str | None = Field(
        None,
        description="PNG whose fully transparent pixels are repainted, the first image's size (URL, data "
        "URL, base64; edits: a file)",
    )
    strength: float | None = Field(
        None, gt=0, le=1, description="how far from the first image denoising starts; default 1.0 with a mask"
    )
    background: Literal["transparent", "opaque", "auto"] | None = Field(
        None, description='images are always opaque: "transparent" is answered with a warning'
    )
    user: str | None = None
    stream: bool = False
    partial_images: int | None = Field(None, ge=0, le=3)
    loras: list[Any] | str | None = Field(
        None, description='LoRA adapters: [{"name" | "url", "scale"?}] (api/loras.py); multipart: its JSON'
    )

    @property
    def image_format(self) -> ImageFormat:
        return ImageFormat.parse(self.output_format or self.format or "png")

    @property
    def wants_url(self) -> bool:
        return self.response_format == "url" and not self.return_base64


def parse_fields(fields: dict[str, Any]) -> ImageRequest:
    """Validate request fields; pydantic's errors become InvalidInput naming the field."""
    return parse_model(ImageRequest, fields)
