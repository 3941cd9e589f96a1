"""Loading a model and its processor through the normal transformers path, and prompts.

The embedded toy checkpoint, a local folder and a hub id all go through ``AutoProcessor``
and the checkpoint's own class (one of :func:`fastv_analysis.adapters.registry`); nothing
is model-specific beyond what :mod:`fastv_analysis.adapters` knows.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

DATA_DIR = Path(__file__).resolve().parent.parent / "data"
DEFAULT_MODEL = str(DATA_DIR / "toy-llava")
DEFAULT_DATA = str(DATA_DIR / "toy-vqa" / "questions.jsonl")
DEFAULT_TEMPLATE = "USER: <image>\n{question} ASSISTANT:"
MC_SUFFIX = "Answer with the option's letter from the given choices directly."


def resolve_device(device: str = "auto") -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(device)
    # accelerate names a CPU process's device "cpu:0"; a model moved there computes some
    # rows 1 ulp away from one on "cpu" (torch 2.13), and a launch's ranks must match one process
    return torch.device("cpu") if dev.type == "cpu" else dev


def sync_device(device: torch.device) -> None:
    """Wait for queued GPU work, so wall-clock timings measure the work itself."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    """auto: bfloat16 (or float16) on GPU, float32 on CPU."""
    if dtype == "auto":
        if device.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.float32
    try:
        return {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}[dtype]
    except KeyError:
        raise ValueError(f"--dtype must be auto, float32, float16 or bfloat16, got {dtype!r}") from None


@dataclass
class Loaded:
    model: torch.nn.Module
    processor: object
    device: torch.device
    dtype: torch.dtype
    name: str


def load_model(name: str, device: str = "auto", dtype: str = "auto") -> Loaded:
    """A supported VLM (SDPA attention, eval mode) and its processor (left padding)."""
    from transformers import AutoConfig, AutoProcessor
    from transformers import logging as hf_logging

    from .adapters import registry

    dev = resolve_device(device)
    dt = resolve_dtype(dtype, dev)
    try:
        config = AutoConfig.from_pretrained(name)
    except OSError as err:
        if not Path(name).exists() and (Path(name).is_absolute() or name.startswith((".", "~"))
                                        or name.count("/") != 1):
            raise ValueError(f"--model {name}: no such directory") from None
        raise ValueError(f"cannot load model {name!r}: not a local directory, and the hub says: "
                         f"{str(err).splitlines()[0]}") from None
    archs = config.architectures or []
    arch = next((a for a in archs if a in registry()), None)
    if arch is None:
        raise ValueError(f"model {name!r} is {archs or config.model_type}: supported are {', '.join(registry())}")
    import transformers

    cls = getattr(transformers, arch)
    verbosity, bars = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        # hub kernels off (transformers 5.25 turns them on by default): see Adapter.check_kernels
        model = cls.from_pretrained(name, dtype=dt, attn_implementation="sdpa", use_kernels=False)
        try:
            processor = AutoProcessor.from_pretrained(name)
        except (OSError, ImportError) as err:
            if "video" not in str(err).lower() and "torchvision" not in str(err).lower():
                raise
            own = registry()[arch].processor
            processor = own(name) if own is not None else image_only_processor(name)
    finally:
        hf_logging.set_verbosity(verbosity)
        if bars:
            hf_logging.enable_progress_bar()
    processor.tokenizer.padding_side = "left"
    model.to(dev).eval()
    return Loaded(model=model, processor=processor, device=dev, dtype=dt, name=str(name))


def image_only_processor(name: str):
    """The model's processor without its video processor, for machines without torchvision.

    Qwen2-VL's, Qwen2.5-VL's and LLaVA-OneVision's processors also own a video processor,
    and those import torchvision, which the CPU torch wheel cannot load. Images do not
    need it: the processor class is built from its tokenizer, its image processor (the PIL
    one when torchvision is missing) and the other saved settings.
    """
    import json

    import transformers
    from transformers import AutoImageProcessor, AutoTokenizer
    from transformers.utils import cached_file

    from .toy.families import image_only

    settings = json.loads(Path(cached_file(name, "processor_config.json")).read_text())
    cls = image_only(getattr(transformers, settings["processor_class"]))
    tokenizer = AutoTokenizer.from_pretrained(name)
    kwargs = {k: v for k, v in settings.items()
              if k not in ("processor_class", "image_processor", "video_processor", "auto_map")}
    return cls(image_processor=AutoImageProcessor.from_pretrained(name), tokenizer=tokenizer,
               chat_template=tokenizer.chat_template, **kwargs)


def question_text(question: str, choices: list[str] | None) -> str:
    """The question as shown to the model; choices become lettered options (ScienceQA style)."""
    if not choices:
        return question
    options = "\n".join(f"{chr(ord('A') + i)}. {c}" for i, c in enumerate(choices))
    return f"{question}\n{options}\n{MC_SUFFIX}"


IMAGE_PLACEHOLDER = "<image>"


def image_placeholder(processor) -> str:
    """The processor's own image placeholder (``<image>``, Qwen's ``<|image_pad|>``, ...)."""
    return getattr(processor, "image_token", None) or IMAGE_PLACEHOLDER


def family_template(processor) -> str | None:
    """The ``prompt_template`` its family declares for a processor without a chat template
    (PaliGemma's ``<image>{question}``), found by the processor's class name
    (``PaliGemmaProcessor`` -> ``PaliGemmaFor...``); None where none is declared."""
    from .adapters import registry

    prefix = type(processor).__name__.removesuffix("Processor") + "For"
    return next((f.prompt_template for n, f in registry().items() if n.startswith(prefix) and f.prompt_template),
                None)


def build_prompt(processor, question: str, choices: list[str] | None = None, template: str | None = None) -> str:
    """The prompt text with exactly one image placeholder, in the processor's own format.

    Uses the processor's chat template where there is one (and no ``template`` was
    forced), otherwise ``template`` (default: the family's ``prompt_template``, e.g.
    PaliGemma's, else LLaVA-1.5's) with ``{question}``. Question files
    say ``<image>`` (or nothing): a question that holds it (LLaVA conversation files start
    with ``"<image>\n"``) gets the image there, rendered as the template renders an image
    (Qwen2-VL: ``<|vision_start|><|image_pad|><|vision_end|>``), instead of a second one;
    more than one is a ValueError (one image per sample). A forced ``template`` also says
    ``<image>``, which becomes the processor's placeholder.
    """
    text = question_text(question, choices)
    placeholders = text.count(IMAGE_PLACEHOLDER)
    if placeholders > 1:
        raise ValueError(f"the question has {placeholders} {IMAGE_PLACEHOLDER} placeholders (one image per sample)")
    if template is None and getattr(processor, "chat_template", None):
        before, _, after = text.partition(IMAGE_PLACEHOLDER) if placeholders else ("", "", text)
        if placeholders and before.strip() == "":
            before, after = "", after.lstrip("\n")  # LLaVA's leading "<image>\n": the template places the image
        parts = [{"type": "text", "text": before}] if before else []
        parts += [{"type": "image"}] + ([{"type": "text", "text": after}] if after else [])
        conversation = [{"role": "user", "content": parts}]
        return processor.apply_chat_template(conversation, add_generation_prompt=True)
    template = template or family_template(processor) or DEFAULT_TEMPLATE
    check_template(template)
    if placeholders:  # the question's own placeholder replaces the template's
        own = IMAGE_PLACEHOLDER + "\n" if IMAGE_PLACEHOLDER + "\n" in template else IMAGE_PLACEHOLDER
        template = template.replace(own, "", 1)
    return template.replace("{question}", text).replace(IMAGE_PLACEHOLDER, image_placeholder(processor))


def check_template(template: str) -> None:
    if "<image>" not in template or "{question}" not in template:
        raise ValueError(f"--prompt-template must contain <image> and {{question}}, got {template!r}")
