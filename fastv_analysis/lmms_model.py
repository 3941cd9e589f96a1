"""``lmms-eval --model fastv``: a supported VLM pruned by :func:`~fastv_analysis.pruning.apply_fastv`,
answering lmms-eval's generation and loglikelihood (multiple-choice) requests (the only module
that imports lmms-eval; options and written files: :mod:`fastv_analysis.lmms_plugin`).

Each request's prompt is lmms-eval's context built into the model's prompt exactly as a question
of our question file is (:func:`~fastv_analysis.loading.build_prompt`), its image the task's
one visual (RGB), and the answer greedy; so ``fastv-analyze capture / select / eval`` on the
written question file give the same prompts, kept sets and answers. Under ``torchrun`` each
rank answers lmms-eval's share of the requests; the samples are numbered over the whole launch
(every rank's (task, doc_id), sorted), which keys the random strategies as the select stage does.
A loglikelihood request's context is prefilled pruned (ranked by the context's last token) and its
continuation scored teacher-forced through the pruned cache (:meth:`FastV.loglikelihood_scores`);
nothing is written for those requests.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from lmms_eval.api.model import lmms

from .distributed import process_group
from .lmms_plugin import (PROMPTS_DIR, answer_text, image_name, parse_options, question_id, sample_ids, truncate,
                          write_answers, write_questions)
from .loading import build_prompt, image_placeholder, load_model
from .pruning import is_image_token
from .samples import Prepared, model_inputs


def _gather(obj, world: int) -> list:
    """Every rank's ``obj`` (a list), concatenated in rank order."""
    if world == 1:
        return list(obj)
    import torch.distributed as dist

    out = [None] * world
    dist.all_gather_object(out, list(obj))
    return [x for part in out for x in part]


def _process_group(device: str):
    """(rank, world, state) of this launch (:func:`~fastv_analysis.distributed.process_group`).

    lmms-eval's ``__main__`` builds an ``Accelerator()`` before the model; under torchrun on a
    machine without GPUs that is one process (accelerate sets up gloo only with ``cpu=True``),
    so every rank would answer as rank 0 of 1 and lmms-eval's gathers would see one rank. That
    state is dropped and set up again for the CPU processes."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1:
        from accelerate.state import AcceleratorState, PartialState

        if PartialState._shared_state and PartialState().num_processes != world:
            AcceleratorState._reset_state(reset_partial_state=True)
    return process_group(device)


def _barrier(world: int) -> None:
    if world > 1:
        import torch.distributed as dist

        dist.barrier()


def continuation_ids(tokenizer, prompt: str, continuation: str) -> list[int]:
    """The continuation's token ids: the tokens of prompt + continuation after the prompt's
    (lm-evaluation-harness's pairing, so a leading space joins the continuation's first word)."""
    whole = tokenizer(prompt + continuation, add_special_tokens=False)["input_ids"]
    return whole[len(tokenizer(prompt, add_special_tokens=False)["input_ids"]):]


def teacher_forced_logprobs(pruned, inputs: dict, target: list[int]) -> tuple[list[float], bool]:
    """Each ``target`` token's log-prob after the prompt ``inputs`` under the pruned model, and
    whether each is the argmax: the prompt prefilled (its cut ranked by the prompt's last token),
    then the target fed through the pruned cache one token at a time, as decode steps are."""
    adapter = pruned.adapter
    mask = inputs.get("attention_mask")
    mask = torch.ones_like(inputs["input_ids"]) if mask is None else mask
    out, greedy = [], True
    with torch.inference_mode():
        cache = adapter.new_cache()
        position_ids, state = adapter.prompt_positions(dict(inputs), mask)
        extra = {k: v for k, v in inputs.items() if k not in ("input_ids", "attention_mask")}
        logits = adapter.next_token_logits(pruned, cache, input_ids=inputs["input_ids"], attention_mask=mask,
                                           position_ids=position_ids, **extra)
        for i, token in enumerate(target):
            logprobs = torch.log_softmax(logits[0].float(), dim=-1)
            out.append(float(logprobs[token]))
            greedy = greedy and int(logprobs.argmax()) == token
            if i == len(target) - 1:
                break
            mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
            logits = adapter.next_token_logits(pruned, cache, input_ids=torch.tensor([[token]], device=mask.device),
                                               attention_mask=mask, position_ids=adapter.decode_positions(mask, state))
    return out, greedy


class FastV(lmms):
    """lmms-eval model ``fastv`` (``--model_args pretrained=PATH,agg_layer=2,keep=64,...``)."""

    is_simple = True

    def __init__(self, max_batch_size=None, **model_args) -> None:
        super().__init__()
        from .pruning import apply_fastv

        self.options = parse_options(model_args)
        config = self.options.fastv_config()
        self._rank, self._world_size, state = _process_group(self.options.device)
        device = self.options.device if state is None else str(state.device)
        self.loaded = load_model(self.options.pretrained, device, self.options.dtype)
        self.pruned = apply_fastv(self.loaded.model, config)
        if state is not None:  # lmms-eval's accelerate backend gathers through lm.accelerator
            from accelerate import Accelerator

            self.accelerator = Accelerator(cpu=state.device.type == "cpu")

    @property
    def device(self):
        return self.loaded.device

    @property
    def batch_size(self) -> int:
        return self.options.batch_size

    def loglikelihood(self, requests) -> list:
        """:meth:`loglikelihood_scores` as lmms-eval 0.7.3's evaluator keeps them: it stores
        ``str(x)`` of any answer but a string, a (string, dict) pair or a ``GenerationResult``,
        whose ``text`` it keeps as is (``api/instance.py``, ``unwrap_generation_output``), and its
        multiple-choice scoring unpacks the stored pair; so each pair travels as a result's text."""
        from lmms_eval.api.instance import GenerationResult

        return [GenerationResult(text=pair) for pair in self.loglikelihood_scores(requests)]

    def loglikelihood_scores(self, requests) -> list[tuple[float, bool]]:
        """(the continuation's loss, every continuation token the argmax) per request.

        The loss is what lmms-eval 0.7.3's own models return and its multiple-choice scoring
        ranks by ``argmin`` (``api/task.py``; lmms-eval issue #370): the mean negative log-prob of the continuation
        tokens, Hugging Face's ``loss`` with the context's labels at -100. The context is
        prefilled pruned (FastV's query: the context's last token, as a generation request's),
        then the continuation is fed through the pruned cache one token at a time,
        teacher-forced, as decode steps are (:meth:`continuation_logprobs`)."""
        from tqdm.auto import tqdm

        records = [self._request(req, target=True) for req in requests]
        ids = sample_ids(_gather([(r["task"], r["doc_id"]) for r in records], self.world_size))
        out = []
        for r in tqdm(records, desc=f"fastv[{self.rank}]", disable=self.rank != 0):
            r["sample_id"] = ids[(r["task"], r["doc_id"])]
            logprobs, greedy = self.continuation_logprobs(r)
            out.append((-sum(logprobs) / len(logprobs), greedy))
        return out

    def continuation_ids(self, prompt: str, continuation: str) -> list[int]:
        """:func:`continuation_ids` with this model's tokenizer."""
        return continuation_ids(self.loaded.processor.tokenizer, prompt, continuation)

    def continuation_logprobs(self, record: dict) -> tuple[list[float], bool]:
        """Each continuation token's log-prob under the pruned model, and whether each is the argmax."""
        prepared = self._prepared(record)
        target = self.continuation_ids(prepared.prompt, record["continuation"])
        if not target:
            raise ValueError(f"task {record['task']}, doc {record['doc_id']}: the continuation "
                             f"{record['continuation']!r} has no tokens")
        self.pruned.fastv.sample_ids = [record["sample_id"]]
        return teacher_forced_logprobs(self.pruned, model_inputs(self.loaded, [prepared]), target)

    def generate_until_multi_round(self, requests):
        raise NotImplementedError("--model fastv answers generate_until tasks only (one round)")

    def _request(self, req, target: bool = False) -> dict:
        """One request as a record: ids, prompt context, generation settings (``target``: a
        loglikelihood request's continuation instead), its one image (RGB)."""
        from PIL import Image

        ctx, gen_kwargs, doc_to_visual, doc_id, task, split = req.args
        doc = self.task_dict[task][split][doc_id]
        continuation = None
        if target:  # a string, or lmms-eval's doc_to_target function
            continuation, gen_kwargs = (gen_kwargs if isinstance(gen_kwargs, str) else gen_kwargs(doc)), None
        visuals = [v for v in (doc_to_visual(doc) if doc_to_visual else []) if v is not None]
        if len(visuals) != 1 or not isinstance(visuals[0], Image.Image):
            raise ValueError(f"task {task}, doc {doc_id}: --model fastv answers one image per question, "
                             f"got {len(visuals)} visual(s) of {sorted({type(v).__name__ for v in visuals})}")
        return {"task": task, "doc_id": int(doc_id), "text": ctx, "gen_kwargs": dict(gen_kwargs or {}),
                "image_obj": visuals[0].convert("RGB"), "question_id": question_id(doc, self.options.id_field,
                                                                                   task, doc_id),
                "answer": answer_text(doc, self.options.answer_field), "category": task,
                "max_new_tokens": int((gen_kwargs or {}).get("max_new_tokens", 128)),
                "padding": bool((req.metadata or {}).get("__padding_only__")), "continuation": continuation}

    def _prepared(self, record: dict) -> Prepared:
        processor = self.loaded.processor
        prompt = build_prompt(processor, record["text"], None, self.options.prompt_template)
        if image_placeholder(processor) not in prompt:
            raise ValueError(f"task {record['task']}, doc {record['doc_id']}: the prompt has no image placeholder")
        inputs = processor(text=[prompt], images=[record["image_obj"]], return_tensors="pt")
        return Prepared(record["sample_id"], None, prompt, record["image_obj"], dict(inputs))

    def _answer(self, batch: list[dict]) -> None:
        """Pruned greedy answers of one batch (same generation settings), into the records."""
        gen = batch[0]["gen_kwargs"]
        inputs = model_inputs(self.loaded, [self._prepared(r) for r in batch])
        self.pruned.fastv.sample_ids = [r["sample_id"] for r in batch]
        seq_len = inputs["input_ids"].shape[1]
        with torch.inference_mode():
            out = self.pruned.generate(**inputs, max_new_tokens=batch[0]["max_new_tokens"], do_sample=False,
                                       pad_token_id=self.loaded.processor.tokenizer.pad_token_id)
        texts = self.loaded.processor.batch_decode(out[:, seq_len:], skip_special_tokens=True)
        kept = self.pruned.last_stage_kept
        n_image = is_image_token(inputs["input_ids"], self.pruned.adapter.image_token_id).sum(dim=1)
        until = gen.get("until") or []
        for b, (r, text) in enumerate(zip(batch, texts)):
            r["prediction"] = truncate(text, [until] if isinstance(until, str) else list(until)).strip()
            r["kept"] = [] if kept is None else sorted(int(i) for i in kept[0][b])  # the first cut's, as select's
            r["n_image_tokens"] = int(n_image[b])

    def generate_until(self, requests) -> list[str]:
        from tqdm.auto import tqdm

        records = [self._request(req) for req in requests]
        world = self.world_size
        ids = sample_ids(_gather([(r["task"], r["doc_id"]) for r in records], world))
        for r in records:
            r["sample_id"] = ids[(r["task"], r["doc_id"])]
        size = max(1, int(self.options.batch_size))
        bar = tqdm(total=len(records), desc=f"fastv[{self.rank}]", disable=self.rank != 0)
        start = 0
        while start < len(records):  # consecutive requests with the same generation settings
            end = start + 1
            while end < len(records) and end - start < size and records[end]["gen_kwargs"] == records[start]["gen_kwargs"]:
                end += 1
            self._answer(records[start:end])
            bar.update(end - start)
            start = end
        bar.close()
        self._write(records)
        return [r["prediction"] for r in records]

    def _write(self, records: list[dict]) -> None:
        """answers_dir and capture_dir, each rank's samples merged (padding requests left out)."""
        opts = self.options
        mine = [r for r in records if not r["padding"]]
        if not (opts.answers_dir or opts.capture_dir):
            return
        seen, unique = set(), []
        for r in mine:
            if r["sample_id"] not in seen:
                seen.add(r["sample_id"])
                unique.append(r)
        for folder in {opts.answers_dir, opts.capture_dir} - {None}:
            images = Path(folder) / PROMPTS_DIR
            for r in unique:
                (images / image_name(r["task"], r["doc_id"])).parent.mkdir(parents=True, exist_ok=True)
                r["image_obj"].save(images / image_name(r["task"], r["doc_id"]))
        keys = ("sample_id", "task", "doc_id", "question_id", "text", "answer", "category", "prediction", "kept",
                "n_image_tokens", "max_new_tokens")
        everyone = _gather([{**{k: r[k] for k in keys}, "image": image_name(r["task"], r["doc_id"])}
                            for r in unique], self.world_size)
        if self.rank == 0 and opts.answers_dir:
            config = {"agg_layer": opts.agg_layer, "keep": opts.keep, "method": opts.method, "alpha": opts.alpha,
                      "positions": self.pruned.fastv.positions}
            write_answers(Path(opts.answers_dir), everyone, str(opts.pretrained), config)
        if opts.capture_dir:
            self._capture(everyone)

    def _capture(self, everyone: list[dict]) -> None:
        """Our capture of the full model on the prompts lmms-eval sent (``fastv-analyze capture``
        on the written question file, this process's model reused; the ranks split it)."""
        from .capture import CaptureConfig, run_capture

        opts = self.options
        folder = Path(opts.capture_dir)
        if self.rank == 0:
            write_questions(folder / PROMPTS_DIR, everyone)
        _barrier(self.world_size)
        cfg = CaptureConfig(model=opts.pretrained, data=str(folder / PROMPTS_DIR / "questions.jsonl"), out=str(folder),
                            agg_layers=[opts.agg_layer], device=opts.device, dtype=opts.dtype,
                            batch_size=opts.batch_size, max_new_tokens=max(r["max_new_tokens"] for r in everyone),
                            prompt_template=opts.prompt_template)
        self.pruned.remove()  # the capture runs the full model
        try:
            run_capture(cfg, progress=False, command=["lmms-eval", "--model", "fastv"], loaded=self.loaded)
        finally:
            from .pruning import apply_fastv

            self.pruned = apply_fastv(self.loaded.model, self.pruned.fastv)
