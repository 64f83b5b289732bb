"""Request and response shapes of the HTTP API (pydantic), as they appear in the OpenAPI schema.

`VideoCreateParams` is OpenAI's create body (prompt, model, seconds, size, input_reference) plus
our documented extensions; the generation knobs map one-to-one onto
turbodiffusion_core.spec.GenerationRequest, which does the model-aware checks. `Video` is
OpenAI's Video object plus our fields (see server.views for how a record becomes one).
"""

from __future__ import annotations

from typing import Any, Literal, Optional

from pydantic import BaseModel, ConfigDict, Field, create_model
from pydantic.fields import FieldInfo

from server.webhooks import EVENT_TYPES
from turbodiffusion_core.spec import GenerationRequest

# Fields of the create body that are handed to spec.GenerationRequest unchanged.
GENERATION_FIELDS = tuple(
    name for name in GenerationRequest.model_fields if name not in ("image_width", "image_height", "model")
)

WebhookEvent = Literal[EVENT_TYPES]  # video.completed, video.failed, video.cancelled, video.in_progress


class ImageReference(BaseModel):
    """OpenAI's reference object form of `input_reference` (JSON, or `input_reference[image_url]`)."""

    model_config = ConfigDict(extra="forbid")

    image_url: Optional[str] = Field(None, max_length=30_000_000, description="https URL or data: URL")
    file_id: Optional[str] = Field(None, max_length=200, description="not supported (no Files API here)")


class VideoCreateParams(BaseModel):
    """Body of POST /v1/videos, as JSON or multipart form fields (the `openai` SDK sends multipart,
    with `extra_body` fields as strings: "true"/"false" for booleans, "" for None)."""

    model_config = ConfigDict(extra="forbid")

    prompt: str = Field(min_length=1, max_length=10_000)
    model: Optional[str] = Field(
        None, max_length=200, description="a preset id (GET /v1/models); default: the one model served, if one"
    )
    seconds: Optional[float] = Field(None, gt=0, le=60, description='clip length, e.g. "5" (16 fps, 4k+1 frames)')
    size: Optional[str] = Field(None, max_length=32, description="WIDTHxHEIGHT, one of the model's sizes")
    input_reference: Optional[ImageReference | str] = Field(
        None, description="first-frame image for image-to-video models: upload, {image_url}, or a URL string"
    )
    # --- extensions: generation ---
    seed: int = Field(0, ge=0, le=2**63 - 1, description="0 draws a random seed (returned on the video)")
    num_frames: Optional[int] = Field(None, ge=1, le=1000, description="4k+1 frames; instead of seconds")
    resolution: Optional[str] = Field(None, max_length=16, description="480p / 720p (instead of size)")
    aspect_ratio: Optional[str] = Field(None, max_length=16, description="16:9, 9:16, 1:1, 4:3, 3:4")
    steps: Optional[int] = Field(None, ge=1, le=100, description="sampling steps (1-4 for rCM models)")
    sigma_max: Optional[float] = Field(None, gt=0, le=10_000, description="rCM initial sigma")
    attention_type: Optional[str] = Field(None, max_length=16, description="auto, original, sla, sagesla")
    sla_topk: Optional[float] = Field(None, gt=0, le=1, description="SLA kept-block fraction")
    quant: Optional[str] = Field(None, max_length=8, description="none, int8, fp8 (as loaded by the worker)")
    ode: bool = Field(False, description="deterministic ODE sampling instead of SDE")
    boundary: Optional[float] = Field(None, ge=0.5, le=1.0, description="I2V high/low expert switch time")
    adaptive_resolution: bool = Field(False, description="I2V: keep the input image's aspect ratio")
    negative_prompt: Optional[str] = Field(None, max_length=10_000, description="original 50-step models only")
    guidance_scale: Optional[float] = Field(None, ge=0, le=30, description="original models: CFG scale")
    shift: Optional[float] = Field(None, gt=0, le=100, description="original models: flow shift")
    # --- extensions: delivery ---
    priority: Literal["high", "normal", "low"] = "normal"
    webhook_url: Optional[str] = Field(None, max_length=2048, description="POSTed signed events for this video")
    webhook_events: Optional[list[WebhookEvent]] = Field(
        None, max_length=4, description="default: video.completed, video.failed"
    )
    metadata: Optional[dict[str, str]] = Field(None, max_length=16, description="up to 16 string pairs, echoed")


REMIX_OVERRIDES = ("seed", "steps", "sigma_max", "attention_type", "sla_topk", "ode", "boundary", "negative_prompt",
                   "guidance_scale", "shift", "priority", "webhook_url", "webhook_events", "metadata")
"""Create fields a remix may change (each left out keeps the source video's value); model, size, length and
input image always stay the source's."""


def _remix_fields() -> dict[str, Any]:
    """The override fields with the create body's types and limits, but defaulting to None ("as before")."""
    fields: dict[str, Any] = {}
    for name in REMIX_OVERRIDES:
        info = VideoCreateParams.model_fields[name]
        fields[name] = (Optional[info.annotation], FieldInfo.merge_field_infos(info, default=None))
    return fields


VideoRemixParams = create_model(
    "VideoRemixParams",
    __config__=ConfigDict(extra="forbid"),
    __doc__="""Body of POST /v1/videos/{id}/remix (JSON, as the `openai` SDK sends it): a new prompt for a completed
    video. The new video keeps the source's model, size, length, generation settings and the seed it used (and,
    for image-to-video, its input image), so the composition carries over; any field below given a value changes
    that setting (seed 0 draws a new random seed).""",
    prompt=(str, Field(min_length=1, max_length=10_000)),
    **_remix_fields(),
)


class VideoRef(BaseModel):
    """OpenAI's `video` reference object of an extension: a completed video of yours."""

    model_config = ConfigDict(extra="forbid")

    id: str = Field(min_length=1, max_length=200)


EXTEND_OVERRIDES = ("seed", "steps", "sigma_max", "attention_type", "sla_topk", "ode", "boundary", "priority",
                    "webhook_url", "webhook_events", "metadata")
"""Create fields an extension may set (generation of the new segment, and delivery)."""


def _create_fields(names: tuple[str, ...]) -> dict[str, Any]:
    return {name: (VideoCreateParams.model_fields[name].annotation, VideoCreateParams.model_fields[name])
            for name in names}


VideoExtendParams = create_model(
    "VideoExtendParams",
    __config__=ConfigDict(extra="forbid"),
    __doc__="""Body of POST /v1/videos/extensions (OpenAI's extend; multipart as the SDK sends it, or JSON): continue
    a completed video. The new segment is generated by an image-to-video model from the video's last frame, at
    the video's size, and the result is the whole video: the original followed by the new segment.""",
    prompt=(str, Field(min_length=1, max_length=10_000, description="what happens in the new segment")),
    video=(Optional[VideoRef], Field(None, description='one of your completed videos: {"id": ...} (form field '
                                                       'video[id]); or upload an MP4 as the multipart file `video`')),
    seconds=(Optional[float], Field(None, gt=0, le=60, description="length of the new segment (16 fps, 4k+1 "
                                                                    "frames); default: the model's default")),
    num_frames=(Optional[int], Field(None, ge=1, le=1000, description="frames of the new segment, instead of "
                                                                       "seconds")),
    model=(Optional[str], Field(None, max_length=200, description="the image-to-video preset to use; default: "
                                                                  "the one served")),
    **_create_fields(EXTEND_OVERRIDES),
)


class VideoError(BaseModel):
    code: str
    message: str


class Video(BaseModel):
    """OpenAI's Video object; fields after `remixed_from_video_id` are extensions."""

    id: str
    object: Literal["video"] = "video"
    status: Literal["queued", "in_progress", "completed", "failed"]
    progress: int
    created_at: int
    completed_at: Optional[int] = None
    expires_at: Optional[int] = None
    model: str
    prompt: Optional[str] = None
    seconds: Optional[str] = None
    size: Optional[str] = None
    error: Optional[VideoError] = None
    remixed_from_video_id: Optional[str] = None
    extended_from_video_id: Optional[str] = Field(None, description="the video an extension continues")
    cancelled: bool = Field(False, description='true when status is "failed" because the video was cancelled')
    queue_position: Optional[int] = Field(None, description="videos ahead of this one (queued only)")
    stage: Optional[str] = Field(None, description="queued, loading, text_encode, denoise, vae_decode, ...")
    step: Optional[int] = None
    total_steps: Optional[int] = None
    seed: Optional[int] = Field(None, description="the seed used (random when 0 was asked)")
    num_frames: Optional[int] = None
    steps: Optional[int] = None
    attention_type: Optional[str] = None
    sla_topk: Optional[float] = Field(None, description="SLA kept-block fraction used")
    ode: Optional[bool] = Field(None, description="true: ODE sampling; false: SDE")
    boundary: Optional[float] = Field(None, description="I2V high/low expert switch time (image-to-video only)")
    quant: Optional[str] = None
    priority: Optional[str] = None
    attempts: int = Field(0, description="times a worker started it (more than 1 after a worker died)")
    timings: dict[str, float] = Field(default_factory=dict, description="seconds per stage")
    metadata: dict[str, str] = Field(default_factory=dict)
    rating: Optional[int] = Field(None, ge=1, le=5, description="your rating, 1-5 (POST /v1/videos/{id}/feedback)")
    note: Optional[str] = Field(None, description="your note on this video (POST /v1/videos/{id}/feedback)")
    webhook_deliveries: list[dict[str, Any]] = Field(default_factory=list)


class VideoFeedback(BaseModel):
    """Body of POST /v1/videos/{id}/feedback (extension): a rating and/or a note kept on the video,
    so a "seed log" of good prompt / seed pairs lives on the server. A field left out is unchanged;
    null clears it."""

    model_config = ConfigDict(extra="forbid")

    rating: Optional[int] = Field(None, ge=1, le=5, description="1 (bad) to 5 (keep this seed); null clears it")
    note: Optional[str] = Field(None, max_length=4000, description="free text; null clears it")


class VideoList(BaseModel):
    object: Literal["list"] = "list"
    data: list[Video]
    first_id: Optional[str] = None
    last_id: Optional[str] = None
    has_more: bool = False


class VideoDeleted(BaseModel):
    id: str
    object: Literal["video.deleted"] = "video.deleted"
    deleted: bool = True


class ModelCard(BaseModel):
    """A preset that a live worker serves, with its capabilities (spec.Preset.describe())."""

    model_config = ConfigDict(extra="allow")

    id: str
    object: Literal["model"] = "model"
    created: int = 0
    owned_by: str = "turbodiffusion"


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]
