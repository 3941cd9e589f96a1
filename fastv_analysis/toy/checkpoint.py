"""Config, tokenizer and processor of the toy LLaVA, and a tiny random checkpoint for tests.

The toy model is transformers' own ``LlavaForConditionalGeneration``: a CLIP vision tower
at 336 px / patch 14 (577 positions, the CLS one dropped by the LLaVA-1.5 "default"
feature strategy, so exactly 576 image tokens), a two-layer GELU projector and a small
Llama decoder. The tokenizer is a word-level ``tokenizers`` model wrapped in
``PreTrainedTokenizerFast``; the image processor is the PIL CLIP processor (no
torchvision needed); the chat template renders LLaVA-1.5's ``USER: <image>\\n{question}
ASSISTANT:``.
"""

from __future__ import annotations

from pathlib import Path

from .scenes import IMAGE_SIZE, vocabulary

IMAGE_TOKEN = "<image>"
SPECIAL_TOKENS = ("<pad>", "<s>", "</s>", "<unk>", IMAGE_TOKEN)
PATCH_SIZE = 14
NUM_IMAGE_TOKENS = (IMAGE_SIZE // PATCH_SIZE) ** 2  # 576

# LLaVA-1.5's template (llava-hf/llava-1.5-7b-hf), images first then text.
CHAT_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] != 'system' %}"
    "{{ message['role'].upper() + ': '}}{% endif %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}"
    "{{ '<image>\n' }}{% endfor %}"
    "{% if message['role'] != 'assistant' %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}"
    "{{ content['text'] + ' '}}{% endfor %}"
    "{% else %}{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}"
    "{% generation %}{{ content['text'] + ' '}}{% endgeneration %}{% endfor %}{% endif %}"
    "{% endfor %}{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}"
)

# Size of the shipped toy (see fastv_analysis.toy.train for how it is trained).
TOY_TEXT = dict(
    hidden_size=128,
    intermediate_size=256,
    num_hidden_layers=8,
    num_attention_heads=4,
    num_key_value_heads=4,
)
TOY_VISION = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=2)

# Size of the random checkpoint for fast tests.
TINY_TEXT = dict(
    hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=2
)
TINY_VISION = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2)


def prompt(question: str) -> str:
    """The LLaVA-1.5 prompt string (what the chat template renders) for one question."""
    return f"USER: {IMAGE_TOKEN}\n{question} ASSISTANT:"


def build_tokenizer(image_token: str = IMAGE_TOKEN, extra_tokens: tuple[str, ...] = ()):
    """Word-level fast tokenizer (lower-cases, splits on whitespace and punctuation, adds <s>).

    ``image_token`` / ``extra_tokens``: the placeholder and special tokens of another
    family's template (Qwen2-VL's ``<|image_pad|>``, ``<|vision_start|>``, ...).
    """
    from tokenizers import Tokenizer, decoders, normalizers, pre_tokenizers, processors
    from tokenizers.models import WordLevel
    from transformers import PreTrainedTokenizerFast

    vocab = {t: i for i, t in enumerate(SPECIAL_TOKENS[:-1] + (image_token, *extra_tokens))}
    for w in vocabulary():
        vocab.setdefault(w, len(vocab))
    tok = Tokenizer(WordLevel(vocab, unk_token="<unk>"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.decoder = decoders.WordPiece(prefix="##", cleanup=True)  # joins words with spaces
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A $B", special_tokens=[("<s>", vocab["<s>"])]
    )
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        pad_token="<pad>",
        extra_special_tokens={"image_token": image_token},
        model_max_length=1024,
        padding_side="left",
    )
    if extra_tokens:
        fast.add_special_tokens({"additional_special_tokens": list(extra_tokens)})
    fast.chat_template = CHAT_TEMPLATE
    return fast


def build_processor(tokenizer=None):
    """LlavaProcessor with the PIL CLIP image processor (336 px, OpenAI CLIP mean/std)."""
    from transformers import LlavaProcessor
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    ip = CLIPImageProcessorPil(
        size={"shortest_edge": IMAGE_SIZE},
        crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE},
        do_center_crop=True,
        do_convert_rgb=True,
    )
    return LlavaProcessor(
        image_processor=ip,
        tokenizer=tokenizer if tokenizer is not None else build_tokenizer(),
        patch_size=PATCH_SIZE,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
        chat_template=CHAT_TEMPLATE,
    )


def build_config(text: dict | None = None, vision: dict | None = None, **overrides):
    """LlavaConfig of the toy (or of any size: pass text=/vision= dicts to override sizes)."""
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig

    tok = build_tokenizer()
    tcfg = LlamaConfig(
        vocab_size=len(tok),
        max_position_embeddings=1024,
        rms_norm_eps=1e-5,
        rope_theta=10000.0,
        tie_word_embeddings=False,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
        **{**TOY_TEXT, **(text or {})},
    )
    vcfg = CLIPVisionConfig(
        image_size=IMAGE_SIZE, patch_size=PATCH_SIZE, projection_dim=32, **{**TOY_VISION, **(vision or {})}
    )
    kw = dict(
        text_config=tcfg,
        vision_config=vcfg,
        image_token_id=tok.convert_tokens_to_ids(IMAGE_TOKEN),
        vision_feature_select_strategy="default",
        vision_feature_layer=-2,
        projector_hidden_act="gelu",
        image_seq_length=NUM_IMAGE_TOKENS,
        pad_token_id=tok.pad_token_id,
        tie_word_embeddings=False,
    )
    kw.update(overrides)
    return LlavaConfig(**kw)


def save_checkpoint(model, out_dir: str | Path, processor=None) -> Path:
    """Save model (safetensors) + processor (tokenizer, image processor, chat template)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    text = model.config.get_text_config()
    model.generation_config.pad_token_id = getattr(model.config, "pad_token_id", None) or text.pad_token_id
    model.generation_config.eos_token_id = model.config.text_config.eos_token_id
    model.generation_config.bos_token_id = model.config.text_config.bos_token_id
    model.generation_config.do_sample = False
    model.save_pretrained(out_dir, safe_serialization=True)
    (processor or build_processor()).save_pretrained(out_dir)
    return out_dir


def save_tiny_random_checkpoint(out_dir: str | Path, seed: int = 0, **overrides) -> Path:
    """Write a random-init, very small LLaVA checkpoint to ``out_dir`` and return the path.

    Same tokenizer, PIL CLIP image processor (336 px -> 576 image tokens) and chat template
    as ``data/toy-llava``, but a 2-layer Llama decoder of width 32 and a 1-layer CLIP of width
    16 (about 0.1 M parameters, ~0.5 MB), so tests exercise the full
    ``AutoProcessor`` / ``LlavaForConditionalGeneration.from_pretrained`` path in about a
    second. Its answers are meaningless.

    ``overrides``: ``text={...}`` / ``vision={...}`` update the Llama / CLIP config fields
    (e.g. ``text={"num_hidden_layers": 4}``); other keywords go to ``LlavaConfig``.
    """
    import torch
    from transformers import LlavaForConditionalGeneration

    text = {**TINY_TEXT, **overrides.pop("text", {})}
    vision = {**TINY_VISION, **overrides.pop("vision", {})}
    cfg = build_config(text=text, vision=vision, **overrides)
    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration(cfg).eval()
    return save_checkpoint(model, out_dir)


def save_tiny_llava_next_checkpoint(out_dir: str | Path, seed: int = 0, image_size: int = 56) -> Path:
    """A random-init, very small ``LlavaNextForConditionalGeneration`` (anyres tiles of
    ``image_size`` px, patch 14, ``image_newline`` tokens) with the toy's tokenizer, the PIL
    LLaVA-NeXT image processor and LLaVA's chat template: images of different sizes give
    different numbers of image tokens, as LLaVA-NeXT's do. For tests (no torchvision)."""
    import torch
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaNextConfig, LlavaNextForConditionalGeneration
    from transformers import LlavaNextProcessor
    from transformers.models.llava_next.image_processing_pil_llava_next import LlavaNextImageProcessorPil

    tok = build_tokenizer()
    grid = [[image_size, 2 * image_size], [2 * image_size, image_size], [2 * image_size, 2 * image_size]]
    processor = LlavaNextProcessor(
        image_processor=LlavaNextImageProcessorPil(size={"shortest_edge": image_size},
                                                   crop_size={"height": image_size, "width": image_size},
                                                   image_grid_pinpoints=grid),
        tokenizer=tok, patch_size=PATCH_SIZE, vision_feature_select_strategy="default", image_token=IMAGE_TOKEN,
        num_additional_image_tokens=1, chat_template=CHAT_TEMPLATE)
    text = LlamaConfig(vocab_size=len(tok), max_position_embeddings=2048, bos_token_id=tok.bos_token_id,
                       eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, tie_word_embeddings=False,
                       **{**TINY_TEXT, "num_hidden_layers": 3, "num_attention_heads": 4, "num_key_value_heads": 2})
    vision = CLIPVisionConfig(image_size=image_size, patch_size=PATCH_SIZE, projection_dim=16, **TINY_VISION)
    config = LlavaNextConfig(vision_config=vision, text_config=text, image_token_id=tok.convert_tokens_to_ids(IMAGE_TOKEN),
                             image_grid_pinpoints=grid, vision_feature_layer=-1,
                             vision_feature_select_strategy="default", pad_token_id=tok.pad_token_id,
                             tie_word_embeddings=False)
    torch.manual_seed(seed)
    model = LlavaNextForConditionalGeneration(config).eval()
    with torch.no_grad():  # larger weights than HF's init, so attention is far from uniform
        generator = torch.Generator().manual_seed(seed)
        for name, param in model.named_parameters():
            if "norm" not in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.15)
    return save_checkpoint(model, out_dir, processor)
