"""Train the toy LLaVA shipped in ``data/toy-llava`` (CPU, seeded).

    python -m fastv_analysis.toy.train --out data/toy-llava    # 4,800 steps, 55.5 min on 2 cores alone

Model: ``LlavaForConditionalGeneration`` built by :func:`fastv_analysis.toy.checkpoint.build_config`
(CLIP 336/14, width 64, 1 layer, features from ``vision_feature_layer=-2`` as in LLaVA-1.5;
GELU projector; Llama decoder, 8 layers, width 128, 4 heads, MLP 256), all trained from
scratch, every weight (vision tower included).

Data: scenes from :mod:`fastv_analysis.toy.scenes`, generated on the fly from the training
seed space (disjoint from the shipped eval split; any scene equal to an eval scene is
skipped). Each training sequence is a multi-turn LLaVA conversation about one image,
``<s>USER: <image>\\nQ1 ASSISTANT: A1</s>USER: Q2 ASSISTANT: A2</s>...`` (up to ``--turns``
distinct questions, categories drawn uniformly), so one pass over the 576 image tokens
supervises several answers; the first turn is exactly the single-turn evaluation prompt.
Loss: cross entropy on the answer tokens and their ``</s>`` only. No curriculum: the
objects are large enough (25 tokens each) to be seen through near-uniform attention.

Optimisation (defaults): AdamW (lr 1e-3, betas 0.9/0.98, weight decay 0.01 on matrices),
linear warm-up 50 steps then cosine decay to 5% over ``--steps``, gradient clipping 1.0,
batch 8 conversations, fp32, ``torch.manual_seed(--seed)``, ``--threads`` torch threads
(run it alone: 2 threads on a busy 2-core machine ran 7x slower). ``--max-minutes`` stops
early (saving). Every ``--eval-every`` steps a 150-question dev set (training seed space,
never trained on) is scored with the full model and with random FastV pruning (agg layer
2, keep 64); the checkpoint is saved each time.

The shipped ``data/toy-llava`` was made by::

    python -m fastv_analysis.toy.train --out data/toy-llava    # 4,800 steps, 55.5 min on 2 cores alone

``--eval-only DIR`` scores a saved checkpoint on ``--questions`` (default: the shipped
``data/toy-vqa/questions.jsonl``) through AutoProcessor + generate, per category, full
and pruned (through :mod:`fastv_analysis.pruning`).
"""

from __future__ import annotations

import argparse
import json
import math
import random
import sys
import time
from pathlib import Path

import numpy as np
import torch

from ..pruning import FastVConfig, apply_fastv
from . import scenes
from .checkpoint import IMAGE_TOKEN, NUM_IMAGE_TOKENS, build_config, build_tokenizer, save_checkpoint

CLIP_MEAN = np.array([0.48145466, 0.4578275, 0.40821073], dtype=np.float32)
CLIP_STD = np.array([0.26862954, 0.26130258, 0.27577711], dtype=np.float32)
DEV_SEED_BASE = 500_000_000  # dev questions: training seed space, far beyond any step used


def pixels(img) -> np.ndarray:
    """Same values as the PIL CLIP processor for a 336x336 RGB image (checked in tests)."""
    a = np.asarray(img, dtype=np.float32) / 255.0
    return ((a - CLIP_MEAN) / CLIP_STD).transpose(2, 0, 1)


class Encoder:
    def __init__(self, tok):
        self.tok = tok
        self.cache: dict[str, list[int]] = {}
        self.bos, self.eos = tok.bos_token_id, tok.eos_token_id
        self.image = tok.convert_tokens_to_ids(IMAGE_TOKEN)
        self.head = [self.bos] + self.words("USER:")

    def words(self, s: str) -> list[int]:
        if s not in self.cache:
            self.cache[s] = self.tok(s, add_special_tokens=False)["input_ids"]
        return self.cache[s]

    def dialogue(self, qas) -> tuple[list[int], list[int]]:
        ids = list(self.head) + [self.image] * NUM_IMAGE_TOKENS
        labels = [-100] * len(ids)
        for t, qa in enumerate(qas):
            q = (self.words("USER:") if t else []) + self.words(qa.text) + self.words("ASSISTANT:")
            a = self.words(qa.answer) + [self.eos]
            ids += q + a
            labels += [-100] * len(q) + a
        return ids, labels


def answer_accuracy(logits: torch.Tensor, labels: torch.Tensor, eos: int) -> tuple[int, int]:
    """(correct, total) greedy answer tokens in a training batch (the </s> labels excluded)."""
    tgt = labels[:, 1:]
    sel = (tgt != -100) & (tgt != eos)
    pred = logits[:, :-1].argmax(-1)
    return int((pred[sel] == tgt[sel]).sum()), int(sel.sum())


def train_dialogue(i: int, exclude, turns: int, rng: random.Random):
    """Training scene i and up to ``turns`` distinct questions about it."""
    objs, _ = scenes.train_sample(i, exclude)
    qas = []
    for _ in range(turns * 3):
        qa = scenes.questions_for(objs, rng, rng.choice(scenes.CATEGORIES))
        if all(qa.text != x.text for x in qas):
            qas.append(qa)
        if len(qas) == turns:
            break
    return objs, qas


def collate(items, pad_id):
    n = max(len(ids) for ids, _, _ in items)
    ids = torch.full((len(items), n), pad_id, dtype=torch.long)
    lab = torch.full((len(items), n), -100, dtype=torch.long)
    att = torch.zeros((len(items), n), dtype=torch.long)
    for b, (x, y, _) in enumerate(items):
        ids[b, : len(x)] = torch.tensor(x)
        lab[b, : len(y)] = torch.tensor(y)
        att[b, : len(x)] = 1
    pix = torch.from_numpy(np.stack([p for _, _, p in items]))
    return ids, lab, att, pix


def dev_set(n: int = 240):
    out = []
    for i in range(n):
        objs, qas = scenes.make_sample(DEV_SEED_BASE + i, categories=(scenes.CATEGORIES[i % len(scenes.CATEGORIES)],))
        out.append((objs, qas[0]))
    return out


@torch.no_grad()
def quick_eval(model, enc, data, prune: dict | None = None, batch: int = 24):
    """Greedy first answer token from one prefill; data = [(objs, qa)]; returns acc per cat."""
    model.eval()
    hits: dict[str, list[int]] = {}
    groups: dict[int, list] = {}
    for objs, qa in data:
        ids, _ = enc.dialogue([])
        ids = ids + enc.words(qa.text) + enc.words("ASSISTANT:")
        groups.setdefault(len(ids), []).append((ids, objs, qa))
    for items in groups.values():
        for s in range(0, len(items), batch):
            chunk = items[s : s + batch]
            ids = torch.tensor([x[0] for x in chunk])
            pix = torch.from_numpy(np.stack([pixels(scenes.render(x[1])) for x in chunk]))
            if prune:  # the library's FastV, random kept sets (per sample: a hash of its ids and pixels)
                with apply_fastv(model, FastVConfig(method="random", **prune)) as pruned:
                    logits = pruned(input_ids=ids, pixel_values=pix).logits[:, -1]
            else:
                logits = model(input_ids=ids, pixel_values=pix).logits[:, -1]
            pred = logits.argmax(-1).tolist()
            for p, (_, _, qa) in zip(pred, chunk):
                hits.setdefault(qa.category, []).append(int(p == enc.words(qa.answer)[0]))
    model.train()
    acc = {k: 100.0 * sum(v) / len(v) for k, v in sorted(hits.items())}
    acc["all"] = 100.0 * sum(sum(v) for v in hits.values()) / sum(len(v) for v in hits.values())
    return acc


def fmt(acc: dict) -> str:
    return " ".join(f"{k}={v:.1f}" for k, v in acc.items())


def train(args) -> None:
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    rng = random.Random(args.seed)
    tok = build_tokenizer()
    enc = Encoder(tok)
    text = {"num_hidden_layers": args.layers, "hidden_size": args.width, "intermediate_size": args.mlp,
            "num_attention_heads": args.heads, "num_key_value_heads": args.heads}
    cfg = build_config(text=text, vision={"hidden_size": args.vision_width})
    from transformers import LlavaForConditionalGeneration

    if args.init_from:  # continue a saved run (stage 2)
        model = LlavaForConditionalGeneration.from_pretrained(args.init_from)
    else:
        model = LlavaForConditionalGeneration(cfg)
    model.set_attn_implementation("sdpa")
    n_params = sum(p.numel() for p in model.parameters())
    print(f"params {n_params / 1e6:.2f}M  config text={text}", flush=True)
    exclude = {scenes.scene_key(o) for _, o, _ in scenes.eval_split()}
    dev = dev_set(150)
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2 and "embed" not in n]
    no_decay = [p for n, p in model.named_parameters() if not (p.dim() >= 2 and "embed" not in n)]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": args.wd}, {"params": no_decay, "weight_decay": 0.0}],
        lr=args.lr, betas=(0.9, 0.98),
    )

    def lr_at(step):
        if step < args.warmup:
            return args.lr * (step + 1) / args.warmup
        t = min(1.0, (step - args.warmup) / max(1, args.steps - args.warmup))
        return args.lr * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * t)))

    t0 = time.time()
    sample = 0
    ema = None
    window: list[tuple[int, int]] = []
    model.train()
    for step in range(args.steps):
        items = []
        for _ in range(args.batch):
            objs, qas = train_dialogue(sample, exclude, args.turns, rng)
            sample += 1
            ids, lab = enc.dialogue(qas)
            items.append((ids, lab, pixels(scenes.render(objs))))
        ids, lab, att, pix = collate(items, tok.pad_token_id)
        lr = lr_at(step)
        for g in opt.param_groups:
            g["lr"] = lr
        out = model(input_ids=ids, attention_mask=att, pixel_values=pix, labels=lab)
        window = (window + [answer_accuracy(out.logits.detach(), lab, tok.eos_token_id)])[-30:]
        acc = sum(c for c, _ in window) / max(1, sum(n for _, n in window))
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), args.clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        ema = out.loss.item() if ema is None else 0.98 * ema + 0.02 * out.loss.item()
        elapsed = (time.time() - t0) / 60
        if step % 25 == 0:
            print(f"step {step} loss {ema:.4f} train-acc {acc:.3f} lr {lr:.2e} {elapsed:.1f} min", flush=True)
        last = step == args.steps - 1 or elapsed > args.max_minutes
        if (step + 1) % args.eval_every == 0 or last:
            full = quick_eval(model, enc, dev)
            pr = quick_eval(model, enc, dev, prune=dict(agg_layer=2, keep=64, seed=0))
            print(f"EVAL step {step + 1} ({elapsed:.1f} min) full: {fmt(full)}", flush=True)
            print(f"EVAL step {step + 1} K2 keep64 random: {fmt(pr)}", flush=True)
            save_checkpoint(model, args.out)
        if last:
            print(f"done: {step + 1} steps, {sample} sequences, {elapsed:.1f} min", flush=True)
            break


def evaluate(ckpt: str, questions: str, out_json: str | None = None, prune_grid: bool = True) -> dict:
    """Score a checkpoint on a question file through AutoProcessor + generate (greedy)."""
    from PIL import Image
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    from ..data import load_questions

    proc = AutoProcessor.from_pretrained(ckpt)
    model = LlavaForConditionalGeneration.from_pretrained(ckpt).eval()
    qs = load_questions(questions)

    def run(wrapper=None):
        hits: dict[str, list[int]] = {}
        for s in range(0, len(qs), 16):
            chunk = qs[s : s + 16]
            texts = [
                proc.apply_chat_template(
                    [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": q.text}]}],
                    add_generation_prompt=True,
                )
                for q in chunk
            ]
            imgs = [Image.open(q.image).convert("RGB") for q in chunk]
            batch = proc(images=imgs, text=texts, return_tensors="pt", padding=True)
            if wrapper is not None:  # random sets keyed like the select stage's (sample id = file position)
                wrapper.fastv.sample_ids = list(range(s, s + len(chunk)))
            with torch.no_grad():
                out = (wrapper or model).generate(**batch, max_new_tokens=3, do_sample=False)
            answers = proc.batch_decode(out[:, batch["input_ids"].shape[1] :], skip_special_tokens=True)
            for q, a in zip(chunk, answers):
                hits.setdefault(q.category, []).append(int(a.strip().lower() == q.answer.strip().lower()))
        acc = {k: 100.0 * sum(v) / len(v) for k, v in sorted(hits.items())}
        acc["all"] = 100.0 * sum(sum(v) for v in hits.values()) / sum(len(v) for v in hits.values())
        return acc

    res = {"full": run()}
    print("full:", fmt(res["full"]), flush=True)
    if prune_grid:
        for method in ("random", "avg_all_heads"):
            for keep in (192, 64, 16, 0):
                with apply_fastv(model, FastVConfig(agg_layer=2, keep=keep, method=method, seed=0)) as m:
                    acc = run(m)
                res[f"K2_keep{keep}_{method}"] = acc
                print(f"K2 keep{keep} {method}:", fmt(acc), flush=True)
    if out_json:
        Path(out_json).write_text(json.dumps(res, indent=1))
    return res


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default="data/toy-llava")
    p.add_argument("--steps", type=int, default=4800)
    p.add_argument("--max-minutes", type=float, default=88.0)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--turns", type=int, default=4)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--wd", type=float, default=0.01)
    p.add_argument("--warmup", type=int, default=50)
    p.add_argument("--clip", type=float, default=1.0)
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--width", type=int, default=128)
    p.add_argument("--mlp", type=int, default=256)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--vision-width", type=int, default=64)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--eval-every", type=int, default=600)
    p.add_argument("--init-from", metavar="CKPT", help="start from a saved checkpoint instead of random init")
    p.add_argument("--eval-only", metavar="CKPT")
    p.add_argument("--questions", default="data/toy-vqa/questions.jsonl")
    p.add_argument("--results", help="write eval results as JSON here")
    args = p.parse_args(argv)
    if args.eval_only:
        evaluate(args.eval_only, args.questions, args.results)
    else:
        train(args)


if __name__ == "__main__":
    sys.exit(main())
