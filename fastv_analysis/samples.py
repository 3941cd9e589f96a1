"""One question made into model inputs: the image and prompt checked and processed on their own
(:func:`prepare`, :class:`BadSample` naming the sample), then moved onto the model's device
(:func:`model_inputs`). Capture and eval both answer from these, so both see the same tokens.
"""

from __future__ import annotations

from dataclasses import dataclass

from .data import sample_name
from .loading import build_prompt, image_placeholder


@dataclass
class PromptSettings:
    """What a prompt depends on besides its question (a ``CaptureConfig`` has these fields too).

    data:            the question file, named in errors.
    benchmark:       a ``fastv_analysis.tasks`` name (its text is the prompt, options included), or None.
    prompt_template: the run's template, or None for the processor's chat template.
    max_new_tokens:  the answer length the prompt must leave room for.
    """

    data: str
    benchmark: str | None = None
    prompt_template: str | None = None
    max_new_tokens: int = 10


class BadSample(ValueError):
    """A sample that cannot be captured; the message names the sample and the file."""

    def __init__(self, question, data_file, reason: str):
        self.question = question
        self.reason = reason
        super().__init__(f"{data_file}: {sample_name(question.question_id)}: {reason}")


@dataclass
class Prepared:
    """One checked sample: its prompt, its image and the processor's output for it alone."""

    sample_id: int
    question: object
    prompt: str
    image: object
    inputs: dict


def _load_image(question, data_file):
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(question.image) as im:
            return im.convert("RGB")
    except FileNotFoundError:
        raise BadSample(question, data_file, f"image {question.image} is missing") from None
    except (UnidentifiedImageError, OSError) as err:
        raise BadSample(question, data_file, f"image {question.image} is unreadable ({err.__class__.__name__})") from None


def prepare(sample_id: int, question, processor, cfg: PromptSettings, max_tokens: int,
            image_token_id: int | tuple[int, ...]) -> Prepared:
    """Load the image and build the prompt of one sample, or raise :class:`BadSample`.

    ``cfg``: a :class:`PromptSettings` (or a ``CaptureConfig``); ``max_tokens``: the model's
    context (``Adapter.max_positions``)."""
    from .pruning import is_image_token

    image = _load_image(question, cfg.data)
    try:  # a benchmark's text is already LLaVA-1.5's prompt text, options included
        choices = question.choices if cfg.benchmark is None else None
        prompt = build_prompt(processor, question.text, choices, cfg.prompt_template)
    except ValueError as err:
        raise BadSample(question, cfg.data, str(err)) from None
    if image_placeholder(processor) not in prompt:
        raise BadSample(question, cfg.data, f"the prompt has no {image_placeholder(processor)} placeholder")
    try:
        inputs = processor(text=[prompt], images=[image], return_tensors="pt")
    except Exception as err:  # any processor complaint is this sample's, in one line
        first = (str(err).strip().splitlines() or [err.__class__.__name__])[0]
        raise BadSample(question, cfg.data, f"the processor refused it ({err.__class__.__name__}: {first})") from None
    ids = inputs["input_ids"]
    if not is_image_token(ids, image_token_id).any():
        raise BadSample(question, cfg.data, "the prompt has no image token after processing")
    if ids.shape[1] + cfg.max_new_tokens > max_tokens:
        raise BadSample(question, cfg.data, f"{ids.shape[1]} prompt tokens + {cfg.max_new_tokens} new tokens "
                                            f"exceed the model's context of {max_tokens}")
    return Prepared(sample_id, question, prompt, image, dict(inputs))


def model_inputs(loaded, batch: list[Prepared]) -> dict:
    """Model inputs of prepared samples on the model's device and dtype (left-padded batch).

    A single sample reuses the processor output :func:`prepare` already made for it.
    """
    if len(batch) == 1:
        inputs = batch[0].inputs
    else:
        # one list of images per prompt: SmolVLM's processor reads a flat list as one prompt's images
        inputs = loaded.processor(text=[p.prompt for p in batch], images=[[p.image] for p in batch],
                                  return_tensors="pt", padding=True)
    inputs = {k: v.to(loaded.device) for k, v in inputs.items()}
    inputs["pixel_values"] = inputs["pixel_values"].to(loaded.dtype)
    return inputs
