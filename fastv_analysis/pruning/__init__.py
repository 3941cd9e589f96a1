"""FastV on an unmodified Hugging Face VLM (LLaVA, LLaVA-NeXT, OneVision, Qwen2-VL / 2.5-VL, InternVL), by hooks.

FastV (Chen et al., 2024): layers 0..K-1 see every token; the last prompt token's
attention at layer K-1 ranks the image tokens; from layer K on only the ``keep`` best
image tokens remain. Here that is done without a copy of transformers' modeling code:

* a pre-hook on the top-level model reads ``input_ids`` and finds each element's image
  span (``input_ids == image_token_id``; left padding and different prompt lengths work);
* a hook on layer K-1's attention recomputes the last prompt row of its attention
  probabilities (:mod:`fastv_analysis.attention`) and ranks it with
  :func:`fastv_analysis.strategies.select`, each batch element on its own;
* pre-hooks on layers >= K gather the kept positions: layer K its hidden states, every
  layer >= K the RoPE ``(cos, sin)`` along the query dim and the 4D mask along query and
  key dims. During decoding the key columns are the kept prompt positions plus every
  position after the prompt. The cache of layers >= K thus holds only kept tokens, while
  the layer-0 cache stays full length, so new tokens get their original RoPE positions,
  and kept tokens keep theirs.

K = 0 (no layer-K attention to rank by) prunes the decoder's input embeddings instead (a
pre-hook on the language model), passing explicit positions; a strategy read before the LLM
(``where`` "input" / "vision": DivPrune, pooling) ranks those embeddings, any other keeps a
random subset. A merging strategy (pooling, or a given :class:`~fastv_analysis.strategies.Merge`
plan) replaces its slots' anchor rows by weighted means of image tokens where a drop
gathers (:mod:`.merge`); ``positions="compact"`` re-numbers the reduced sequence
(:mod:`.compact`), ``"original"`` keeps every kept token's (anchor's) position. Random
subsets (K = 0 and ``method="random"``) are drawn per sample, keyed by (seed, sample): an
explicit ``sample_ids`` or a hash of the element's unpadded input ids and pixel values,
so a sample keeps the same set whatever its batch, and the same set as the select stage
when ``sample_ids`` are the run's sample ids.
``mode="mask"`` keeps every token but masks the pruned ones out as keys from layer K on,
as the reference implementation did; it exists to check ``mode="drop"`` against.

Images of different sizes in one batch give each element its own N: every element keeps
``keep`` image tokens, and the rows that keep fewer positions carry some pruned image
tokens as fillers that no token attends to. A schedule (``stages``) cuts again at later
layers, each cut ranking what the previous one kept by the pruned model's attention. All
reading and rewriting of transformers' calls goes through the model's
:class:`~fastv_analysis.adapters.Adapter`.

Nothing on the model is changed permanently: :func:`apply_fastv` returns a wrapper that
owns the hook handles and removes them on :meth:`FastVModel.remove` / context exit.

The package, by what each part does (each module's docstring says more):

* :mod:`.config`   what to prune: :class:`FastVConfig`, schedule :class:`Stage` s;
* :mod:`.cut`      the geometry of a cut, pure tensor functions (spans, masks, fillers, keys);
* :mod:`.prompt`   what one prefill decided, reused by its decode steps;
* :mod:`.online`   ranking at layer K-1 through the strategy registry;
* :mod:`.rewrite`  rewriting the calls of layers >= K (drop / mask) and the K = 0 input;
* :mod:`.merge`    merge reductions: the anchors' rows replaced by their slots' weighted means;
* :mod:`.compact`  the ``compact`` positions policy (the reduced sequence re-numbered);
* :mod:`.hooks`    the hook set, installed and removed as one context;
* :mod:`.model`    :class:`FastVModel`, the wrapper a user holds, and :func:`apply_fastv`;
* :mod:`.decode`   shared-prefix prefill and greedy decoding of C kept sets (eval).
"""

from .config import ALIASES, MODES, PDROP_LAMBDA, PDROP_LAYERS, FastVConfig, Stage, pyramid_drop
from .cut import (
    decode_key_positions,
    filler_positions,
    fixed_image_positions,
    image_attention,
    image_positions,
    is_image_token,
    kept_token_mask,
    keys_masked_out,
    last_token_positions,
    mask_fillers,
    mask_to_positions,
    padded_image_positions,
    sample_keys,
    slice_mask,
)
from .decode import SharedPrefill, drop_plan, greedy_decode, prefill_shared, shared_greedy_answers
from .model import FastVModel, apply_fastv

__all__ = [
    "ALIASES", "MODES", "PDROP_LAMBDA", "PDROP_LAYERS", "FastVConfig", "FastVModel", "SharedPrefill", "Stage",
    "apply_fastv", "decode_key_positions", "drop_plan", "pyramid_drop",
    "filler_positions", "fixed_image_positions", "greedy_decode", "image_attention", "image_positions",
    "kept_token_mask", "keys_masked_out", "last_token_positions", "mask_fillers", "mask_to_positions",
    "is_image_token", "padded_image_positions", "prefill_shared", "sample_keys", "shared_greedy_answers", "slice_mask",
]
