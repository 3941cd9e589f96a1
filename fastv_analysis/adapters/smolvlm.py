"""SmolVLM (``SmolVLMForConditionalGeneration``): transformers' ``modeling_smolvlm.py`` is
generated from Idefics3's (SigLIP tower, pixel shuffle: 9x or 16x in the released sizes, a
SmolLM2 Llama decoder at ``model.model.text_model``) and its processor expands an image into
the same tile spans (``<fake_token_around_image><row_i_col_j>``, ``\\n`` after each tile row,
the global image last), so the adapter, the layout rule and the tiny recipe are Idefics3's
(:mod:`.idefics3`). Two things differ outside the model: SmolVLM's processor needs the
``num2words`` package, and it reads a flat image list as one prompt's images (a batch passes
one list per prompt).
"""

from __future__ import annotations

from functools import partial

from .family import Family
from .idefics3 import CONTRACT, build, save_tiny

FAMILIES = (
    Family("SmolVLMForConditionalGeneration", build, partial(save_tiny, prefix="SmolVLM"), CONTRACT,
           note="Idefics3's tile spans and pixel shuffle, SmolLM2 decoder; the processor needs num2words"),
)
