"""The lmms-eval plug-in (``lmms-eval --model fastv``, fastv_analysis.lmms_model) without the hub.

lmms-eval 0.7.3 runs local task YAMLs (``--include_path``) written here, reading POPE- and
ScienceQA-shaped local files; the model is the toy LLaVA (data/toy-llava) or a tiny random
Qwen2.5-VL (images of mixed sizes). Three equalities:

(a) the plug-in's predictions (answers_dir) == ``fastv-analyze eval``'s for the same prompts,
    configuration and keep, token for token (and its kept sets == ``select``'s);
(b) lmms-eval's score on them == ``fastv-analyze score --rules lmms-eval`` on the same answers;
(c) the capture written through lmms-eval (capture_dir) == ``fastv-analyze capture`` on the
    same prompts (the question file it wrote).

``loglikelihood`` (multiple-choice tasks): the pruned continuation log-probs == mask mode over
context + continuation with the kept set the context's last token chose; unpruned == the model's;
a multiple_choice task YAML runs through lmms-eval and scores by them.

Needs the ``lmms`` extra (lmms-eval, PyPI's torch + torchvision): skipped otherwise.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import polars as pl
import pytest
import torch

lmms_eval = pytest.importorskip("lmms_eval", reason="lmms-eval is not installed: pip install -e '.[lmms]' "
                                                    "(with PyPI's torch + torchvision; .ci/run's plug-in job)")

from fastv_analysis.cli.main import main  # noqa: E402
from fastv_analysis.store import open_run  # noqa: E402
from fastv_analysis.testing import TOY_DIR  # noqa: E402

TOY_VQA = TOY_DIR.parent / "toy-vqa"
KEEP = 4  # image tokens kept of 576: harsh enough that the toy gets some POPE answers wrong
POPE_SUFFIX = "\nAnswer the question using a single word or phrase."
SQA_SUFFIX = "\nAnswer with the option's letter from the given choices directly."
OFFLINE = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
           "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}

UTILS = '''
from pathlib import Path
from PIL import Image
from lmms_eval.tasks.pope.utils import (pope_aggregate_accuracy, pope_aggregate_f1_score, pope_aggregate_precision,
                                        pope_aggregate_recall, pope_aggregate_yes_ratio, pope_doc_to_text,
                                        pope_process_results)
from lmms_eval.tasks.scienceqa.utils import sqa_doc_to_target, sqa_doc_to_text, sqa_process_results


def doc_to_visual(doc):  # the local files name the image by path (the hub's datasets hold it)
    return [Image.open(doc["image"]).convert("RGB")]
'''

POPE_YAML = """dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
task: {task}
test_split: test
output_type: generate_until
doc_to_visual: !function utils.doc_to_visual
doc_to_text: !function utils.pope_doc_to_text
doc_to_target: "answer"
generation_kwargs:
  max_new_tokens: {tokens}
  temperature: 0
  do_sample: false
process_results: !function utils.pope_process_results
metric_list:
  - metric: pope_accuracy
    aggregation: !function utils.pope_aggregate_accuracy
    higher_is_better: true
  - metric: pope_precision
    aggregation: !function utils.pope_aggregate_precision
    higher_is_better: true
  - metric: pope_recall
    aggregation: !function utils.pope_aggregate_recall
    higher_is_better: true
  - metric: pope_f1_score
    aggregation: !function utils.pope_aggregate_f1_score
    higher_is_better: true
lmms_eval_specific_kwargs:
  default:
    pre_prompt: ""
    post_prompt: ""  # the toy model knows no more words
"""

SQA_YAML = """dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
task: {task}
test_split: test
output_type: generate_until
doc_to_visual: !function utils.doc_to_visual
doc_to_text: !function utils.sqa_doc_to_text
doc_to_target: !function utils.sqa_doc_to_target
generation_kwargs:
  max_new_tokens: {tokens}
  temperature: 0
  do_sample: false
metric_list:
  - metric: exact_match
    aggregation: mean
    higher_is_better: true
process_results: !function utils.sqa_process_results
lmms_eval_specific_kwargs:
  default:
    format: default
    pre_prompt: ""
    post_prompt: "\\nAnswer with the option's letter from the given choices directly."
"""


def toy_questions(n: int, yes_no: bool) -> list[dict]:
    """The first n toy-vqa questions answered yes/no (else the others), images by path."""
    out = []
    for line in (TOY_VQA / "questions.jsonl").read_text().splitlines():
        q = json.loads(line)
        if (q["answer"] in ("yes", "no")) == yes_no:
            out.append({**q, "image": str(TOY_VQA / q["image"])})
        if len(out) == n:
            return out
    raise AssertionError("toy-vqa has too few questions")


def write_pope(root: Path, questions: list[dict]) -> tuple[Path, Path]:
    """(lmms-eval's local POPE file, our POPE folder in LLaVA's layout) of the same questions."""
    folder = root / "pope"
    (folder / "coco").mkdir(parents=True)
    (folder / "val2014").mkdir()
    docs, test, labels = [], [], []
    for i, q in enumerate(questions):
        name = f"COCO_val2014_{i:012d}.png"
        shutil.copy(q["image"], folder / "val2014" / name)
        docs.append({"question_id": str(i), "question": q["text"], "answer": q["answer"], "category": "random",
                     "image": str(folder / "val2014" / name)})
        test.append({"question_id": str(i), "image": name, "text": q["text"] + POPE_SUFFIX, "category": "random"})
        labels.append({"question_id": str(i), "image": name, "text": q["text"], "label": q["answer"]})
    for path, rows in ((root / "pope_lmms.jsonl", docs), (folder / "llava_pope_test.jsonl", test),
                       (folder / "coco" / "coco_pope_random.json", labels)):
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return root / "pope_lmms.jsonl", folder


def write_scienceqa(root: Path, questions: list[dict]) -> tuple[Path, Path]:
    """(lmms-eval's local ScienceQA file, our ScienceQA folder in LLaVA's layout): each toy
    question with its answer and two other answers of the toy's as options."""
    folder = root / "scienceqa"
    docs, llava, problems = [], [], {}
    pool = sorted({q["answer"] for q in questions} | {"red", "blue", "one", "two"})
    for i, q in enumerate(questions):
        pid = str(1000 + i)
        choices = [q["answer"]] + [a for a in pool if a != q["answer"]][i % 2: i % 2 + 2]
        choices = choices[i % 3:] + choices[: i % 3]  # the right option at A, B or C
        (folder / "images" / "test" / pid).mkdir(parents=True)
        shutil.copy(q["image"], folder / "images" / "test" / pid / "image.png")
        answer = choices.index(q["answer"])
        docs.append({"question_id": pid, "question": q["text"], "hint": "", "choices": choices, "answer": answer,
                     "image": str(folder / "images" / "test" / pid / "image.png")})
        options = "\n".join(f"{chr(65 + k)}. {c}" for k, c in enumerate(choices))
        llava.append({"id": pid, "image": f"{pid}/image.png", "conversations": [
            {"from": "human", "value": f"<image>\n{q['text']}\n{options}"}, {"from": "gpt", "value": "A"}]})
        problems[pid] = {"choices": choices, "answer": answer, "subject": "toy", "split": "test"}
    (root / "sqa_lmms.jsonl").write_text("".join(json.dumps(r) + "\n" for r in docs))
    (folder / "llava_test_CQM-A.json").write_text(json.dumps(llava))
    (folder / "problems.json").write_text(json.dumps(problems))
    return root / "sqa_lmms.jsonl", folder


def write_tasks(root: Path, tokens: int, **data: Path) -> Path:
    """A task folder for --include_path: utils.py and one YAML per task (pope_local, sqa_local)."""
    tasks = root / "tasks"
    tasks.mkdir()
    (tasks / "utils.py").write_text(UTILS)
    for task, path in data.items():
        yaml = POPE_YAML if task.startswith("pope") else SQA_YAML
        (tasks / f"{task}.yaml").write_text(yaml.format(data=path, task=task, tokens=tokens))
    return tasks


def run_lmms_eval(root: Path, model: Path, tasks: Path, names: str, model_args: str, launcher=(), batch_size=1) -> dict:
    """``lmms-eval --model fastv`` in a subprocess; its results JSON (lmms-eval exits 0 even when
    a task fails, so a missing results file is the failure)."""
    out = root / "lmms-out"
    cmd = [*launcher, "-m", "lmms_eval", "--model", "fastv", "--model_args", f"pretrained={model},{model_args}",
           "--tasks", names, "--include_path", str(tasks), "--batch_size", str(batch_size), "--output_path", str(out),
           "--log_samples"]
    cmd = [sys.executable, *cmd] if not launcher else cmd
    env = {**os.environ, **OFFLINE, "HF_HOME": str(root / "hf"), "PYTHONPATH": str(Path(__file__).parents[1])}
    done = subprocess.run(cmd, env=env, cwd=root, capture_output=True, text=True, timeout=900)
    found = sorted(out.rglob("*_results.json"))
    assert done.returncode == 0 and found, f"lmms-eval failed:\n{done.stdout[-3000:]}\n{done.stderr[-6000:]}"
    return json.loads(found[-1].read_text())


@pytest.fixture(scope="module")
def toy_run(tmp_path_factory):
    """lmms-eval on the toy LLaVA: a POPE- and a ScienceQA-shaped task, pruned at K = 2 to KEEP tokens."""
    root = tmp_path_factory.mktemp("lmms")
    pope_file, pope_dir = write_pope(root, toy_questions(12, yes_no=True))
    sqa_file, sqa_dir = write_scienceqa(root, toy_questions(4, yes_no=False))
    tasks = write_tasks(root, 10, pope_local=pope_file, sqa_local=sqa_file)
    results = run_lmms_eval(root, TOY_DIR, tasks, "pope_local,sqa_local",
                            f"agg_layer=2,keep={KEEP},method=avg_all_heads,capture_dir={root / 'cap'},"
                            f"answers_dir={root / 'ans'}")
    return {"root": root, "results": results, "pope": pope_dir, "sqa": sqa_dir}



def ours_eval(cap: Path, keep: int, method: str = "avg_all_heads") -> pl.DataFrame:
    """``fastv-analyze select`` + ``eval`` on the capture the plug-in wrote: (sample_id, prediction, kept)."""
    assert main(["select", str(cap), "--methods", method, "--keep", str(keep), "--quiet"]) == 0
    assert main(["eval", str(cap), "--methods", method, "--keep", str(keep), "--timing-samples", "0", "--quiet"]) == 0
    pred = pl.read_parquet(cap / "eval" / "predictions.parquet").filter(pl.col("config") == method,
                                                                       pl.col("keep") == keep)
    sel = pl.read_parquet(cap / "select" / "selections.parquet").filter(pl.col("config") == method,
                                                                       pl.col("keep") == keep)
    return pred.select("sample_id", "prediction").join(sel.select("sample_id", "kept"), on="sample_id").sort("sample_id")


def plugin_predictions(ans: Path) -> pl.DataFrame:
    return pl.read_parquet(ans / "predictions.parquet").select("sample_id", "prediction", "kept").sort("sample_id")


def test_plugin_predictions_equal_fastv_eval(toy_run):
    """(a) lmms-eval's prompts answered by the plug-in == select + eval on its capture, token for token."""
    root = toy_run["root"]
    mine = plugin_predictions(root / "ans")
    ours = ours_eval(root / "cap", KEEP)
    assert mine.height == ours.height == 16
    assert mine["prediction"].to_list() == ours["prediction"].to_list()
    assert [sorted(k) for k in mine["kept"].to_list()] == [sorted(k) for k in ours["kept"].to_list()]
    # what lmms-eval scored are these answers (its logged samples)
    logged = {}
    for path in (root / "lmms-out").rglob("*_samples_*.jsonl"):
        for line in path.read_text().splitlines():
            s = json.loads(line)
            answer = s["filtered_resps"]  # one request per doc: lmms-eval logs the text itself
            logged[(path.name.split("_samples_")[1].removesuffix(".jsonl"), s["doc_id"])] = (
                answer[0] if isinstance(answer, list) else answer)
    answers = pl.read_parquet(root / "ans" / "predictions.parquet")
    assert {(t, d): p for t, d, p in answers.select("task", "doc_id", "prediction").iter_rows()} == logged


@pytest.mark.parametrize("positions", [None, "original"])
def test_plugin_positions_policy_equals_fastv_eval(toy_run, tmp_path, positions):
    """``positions=``: pooling (a merge, registered compact) through the plug-in, by default under
    its own policy, answers as ``fastv-analyze eval`` under the same policy."""
    root = toy_run["root"]
    tasks = write_tasks(tmp_path, 10, pope_local=root / "pope_lmms.jsonl")
    arg = "" if positions is None else f",positions={positions}"
    run_lmms_eval(tmp_path, TOY_DIR, tasks, "pope_local", f"agg_layer=2,keep={KEEP},method=pooling{arg},"
                  f"capture_dir={tmp_path / 'cap'},answers_dir={tmp_path / 'ans'}")
    policy = positions or "compact"
    answers = pl.read_parquet(tmp_path / "ans" / "predictions.parquet")
    assert set(answers["positions"]) == {policy}
    cap = tmp_path / "cap"
    assert main(["select", str(cap), "--methods", "pooling", "--keep", str(KEEP), "--quiet"]) == 0
    assert main(["eval", str(cap), "--methods", "pooling", "--keep", str(KEEP), "--timing-samples", "0", "--quiet",
                 "--positions", policy]) == 0
    ours = pl.read_parquet(cap / "eval" / "predictions.parquet").filter(pl.col("method") == "pooling")
    assert set(ours["positions"]) == {policy} and ours.height == 12
    assert answers.sort("sample_id")["prediction"].to_list() == ours.sort("sample_id")["prediction"].to_list()


def test_lmms_eval_score_equals_fastv_score(toy_run, tmp_path):
    """(b) lmms-eval's metrics on the plug-in's answers == fastv-analyze score --rules lmms-eval."""
    root, results = toy_run["root"], toy_run["results"]["results"]
    pope, sqa = tmp_path / "pope.json", tmp_path / "sqa.json"
    assert main(["score", "--benchmark", "pope", "--data", str(toy_run["pope"]), "--answers",
                 str(root / "ans" / "answers" / "pope_local.jsonl"), "--rules", "lmms-eval", "--out", str(pope)]) == 0
    assert main(["score", "--benchmark", "scienceqa_img", "--data", str(toy_run["sqa"]), "--answers",
                 str(root / "ans" / "answers" / "sqa_local.jsonl"), "--rules", "lmms-eval", "--out", str(sqa)]) == 0
    ours = json.loads(pope.read_text())["metrics"]
    for metric in ("accuracy", "precision", "recall", "f1"):
        theirs = results["pope_local"][f"pope_{metric}{'_score' if metric == 'f1' else ''},none"]
        assert ours[metric] == pytest.approx(100 * theirs, abs=1e-9), metric
    assert 0 < ours["accuracy"] < 100  # the toy answers some right, some wrong: the comparison discriminates
    sqa_ours = json.loads(sqa.read_text())["metrics"]["img_accuracy"]
    assert sqa_ours == pytest.approx(100 * results["sqa_local"]["exact_match,none"], abs=1e-9)


def _capture_contents(run_dir: Path) -> tuple[pl.DataFrame, dict]:
    run = open_run(run_dir)
    volatile = ["capture_seconds", "shard", "part_row", "part_sha256", "part_bytes", "image"]
    samples = run.samples.drop(volatile).sort("sample_id")
    tensors = {sid: run.last_token_attention(sid, 2) for sid in run.sample_ids}
    return samples, tensors


def test_capture_through_lmms_eval_equals_fastv_capture(toy_run, tmp_path):
    """(c) capture_dir == fastv-analyze capture on the question file of the prompts lmms-eval sent."""
    cap = toy_run["root"] / "cap"
    questions = cap / "lmms-prompts" / "questions.jsonl"
    assert main(["capture", "--model", str(TOY_DIR), "--data", str(questions), "--out", str(tmp_path / "run"),
                 "--agg-layers", "2", "--max-new-tokens", "10", "--quiet"]) == 0
    mine, mine_t = _capture_contents(cap)
    ours, ours_t = _capture_contents(tmp_path / "run")
    assert mine.height == 16 and mine.equals(ours)
    assert mine_t.keys() == ours_t.keys() and all(torch.equal(mine_t[k], ours_t[k]) for k in mine_t)
    run = json.loads((cap / "run.json").read_text())
    assert run["data"] == str(questions) and run["agg_layers"] == [2] and run["max_new_tokens"] == 10


SIZES = [(56, 56), (196, 112), (120, 80), (84, 140), (112, 112)]


@pytest.fixture(scope="module")
def qwen_run(tmp_path_factory):
    """lmms-eval on a tiny random Qwen2.5-VL, images of mixed sizes (each its own N), answered two
    requests a batch; random pruning keyed by the launch's sample ids."""
    import numpy as np
    from PIL import Image

    from fastv_analysis.adapters import registry

    root = tmp_path_factory.mktemp("lmms-qwen")
    model = registry()["Qwen2_5_VLForConditionalGeneration"].tiny(root / "m", seed=2)
    rng = np.random.default_rng(3)
    questions = []
    for i, (w, h) in enumerate(SIZES):
        path = root / f"img{i}.png"
        Image.fromarray((rng.random((h, w, 3)) * 255).astype("uint8")).save(path)
        questions.append({"text": ["is there a cat?", "is it red?"][i % 2], "answer": ["yes", "no"][i % 2],
                          "image": str(path)})
    pope_file, pope_dir = write_pope(root, questions)
    tasks = write_tasks(root, 3, pope_local=pope_file)
    runs = {}
    for method in ("avg_all_heads", "random"):
        out = root / method
        out.mkdir()
        runs[method] = run_lmms_eval(out, model, tasks, "pope_local",
                                     f"agg_layer=2,keep=3,method={method},dtype=float32,"
                                     f"capture_dir={out / 'cap'},answers_dir={out / 'ans'}", batch_size=2)
    return {"root": root, "model": model, "runs": runs}


@pytest.mark.parametrize("method", ["avg_all_heads", "random"])
def test_qwen_mixed_sizes_batched_equal_fastv_eval(qwen_run, method):
    """(a) on Qwen2.5-VL: batches of mixed image sizes answer as eval answers each sample alone."""
    out = qwen_run["root"] / method
    mine = plugin_predictions(out / "ans")
    ours = ours_eval(out / "cap", 3, method)
    assert mine.height == ours.height == len(SIZES)
    assert len(set(pl.read_parquet(out / "ans" / "predictions.parquet")["n_image_tokens"])) > 1
    assert mine["prediction"].to_list() == ours["prediction"].to_list()
    assert [sorted(k) for k in mine["kept"].to_list()] == [sorted(k) for k in ours["kept"].to_list()]


def test_two_processes_equal_one(toy_run, tmp_path):
    """torchrun --nproc_per_node 2 -m lmms_eval: each rank answers and captures its share, the
    capture shards merge, and every result equals the one-process run."""
    root = toy_run["root"]
    launcher = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29531"]
    results = run_lmms_eval(tmp_path, TOY_DIR, root / "tasks", "pope_local,sqa_local",
                            f"agg_layer=2,keep={KEEP},method=avg_all_heads,capture_dir={tmp_path / 'cap'},"
                            f"answers_dir={tmp_path / 'ans'}", launcher=launcher)
    assert {t: {k: v for k, v in r.items() if "stderr" not in k} for t, r in results["results"].items()} == \
        {t: {k: v for k, v in r.items() if "stderr" not in k} for t, r in toy_run["results"]["results"].items()}
    assert plugin_predictions(tmp_path / "ans").equals(plugin_predictions(root / "ans"))
    shards = {int(p.name.split("-")[1]) for p in (tmp_path / "cap" / "attention").glob("part-*.parquet")}
    assert shards == {0, 1}  # each rank wrote its own parts
    mine, mine_t = _capture_contents(tmp_path / "cap")
    ours, ours_t = _capture_contents(root / "cap")
    assert mine.equals(ours) and mine_t.keys() == ours_t.keys()
    assert all(torch.equal(mine_t[k], ours_t[k]) for k in mine_t)


# loglikelihood: the context prefilled pruned (query: the context's last token), the continuation
# teacher-forced through the pruned cache; lmms-eval 0.7.3 ranks choices by argmin of the first
# element (api/task.py, process_results of multiple_choice), which its models fill with HF's loss.
CONTINUATION = " two red objects and one blue"


@pytest.fixture(scope="module")
def toy_plugins():
    """The plug-in's model on the toy LLaVA in this process: pruned at K = 2 to KEEP, and unpruned."""
    from fastv_analysis.lmms_model import FastV

    return {on: FastV(pretrained=str(TOY_DIR), agg_layer=2, keep=KEEP, use_fast_v=on, dtype="float32")
            for on in (True, False)}


def _ll_request(plugin, text: str, image_path: str, continuation: str, doc_id: int = 0):
    """One lmms-eval loglikelihood request (its args) on a one-doc task of this image."""
    from types import SimpleNamespace

    from PIL import Image

    plugin.task_dict = {"mc_local": {"test": {doc_id: {"image": Image.open(image_path).convert("RGB")}}}}
    args = (text, continuation, lambda doc: [doc["image"]], doc_id, "mc_local", "test")
    return SimpleNamespace(args=args, metadata=None)


def _reference_logprobs(plugin, req, fastv: dict | None, sets: dict | None = None,
                        model=TOY_DIR) -> tuple[torch.Tensor, list[int]]:
    """The continuation's log-probs from ONE forward of context + continuation on a freshly loaded
    model: mask mode with the kept set that a prefill of the context alone chose (``fastv``), or no
    pruning (None). ``sets`` gets that kept set and the one a prefill of the whole would choose."""
    sets = {} if sets is None else sets
    from fastv_analysis.loading import load_model
    from fastv_analysis.pruning import apply_fastv
    from fastv_analysis.samples import model_inputs

    record = {**plugin._request(req, target=True), "sample_id": 0}
    prepared = plugin._prepared(record)
    cont = plugin.continuation_ids(prepared.prompt, record["continuation"])
    loaded = load_model(str(model), "cpu", "float32")
    inputs = model_inputs(loaded, [prepared])
    full = {**inputs, "input_ids": torch.cat([inputs["input_ids"], torch.tensor([cont])], dim=1)}
    if "mm_token_type_ids" in inputs:  # Qwen2-VL's M-RoPE: the continuation is text
        types = inputs["mm_token_type_ids"]
        full["mm_token_type_ids"] = torch.cat([types, types.new_zeros(1, len(cont))], dim=1)
    full["attention_mask"] = torch.ones_like(full["input_ids"])
    with torch.inference_mode():
        if fastv is None:
            logits = loaded.model(**full).logits
        else:
            with apply_fastv(loaded.model, **fastv) as m:
                m(**inputs)
                kept = m.last_stage_kept[0]
            with apply_fastv(loaded.model, **fastv, mode="mask", kept=kept) as m:
                logits = m(**full).logits
            with apply_fastv(loaded.model, **fastv) as m:  # the continuation's last token as the query
                m(**full)
                sets["context"], sets["full"] = kept, m.last_stage_kept[0]
    n = inputs["input_ids"].shape[1]
    logprobs = logits[0, n - 1: n - 1 + len(cont)].float().log_softmax(-1)
    return logprobs[torch.arange(len(cont)), torch.tensor(cont)], cont


def test_loglikelihood_equals_mask_mode_over_the_full_sequence(toy_plugins):
    """(a) pruned: the plug-in's continuation log-probs (drop, decode steps through the pruned
    cache) == mask mode over context + continuation in one forward, with the kept set the
    context's last token chose; lmms-eval gets their mean negated (HF's loss)."""
    plugin = toy_plugins[True]
    q = toy_questions(1, yes_no=False)[0]
    req = _ll_request(plugin, q["text"], q["image"], CONTINUATION)
    [(loss, greedy)] = plugin.loglikelihood_scores([req])
    sets = {}
    ref, cont = _reference_logprobs(plugin, req, {"agg_layer": 2, "keep": KEEP}, sets)
    assert not torch.equal(sets["context"].sort().values, sets["full"].sort().values)  # the query matters here
    mine, mine_greedy = plugin.continuation_logprobs({**plugin._request(req, target=True), "sample_id": 0})
    assert len(cont) > 3 and len(mine) == len(cont)
    assert torch.allclose(torch.tensor(mine), ref, atol=1e-5)
    assert loss == pytest.approx(-float(ref.sum()) / len(cont), abs=1e-5)
    assert greedy == mine_greedy
    off = toy_plugins[False]
    [unpruned] = off.loglikelihood_scores([_ll_request(off, q["text"], q["image"], CONTINUATION)])
    assert abs(unpruned[0] - loss) > 1e-3  # keeping KEEP of 576 image tokens changes the likelihood


def test_loglikelihood_unpruned_equals_the_model(toy_plugins):
    """(b) use_fast_v=false: the plug-in's log-probs == the unmodified model's over context + continuation."""
    plugin = toy_plugins[False]
    for i, q in enumerate(toy_questions(3, yes_no=True)):
        req = _ll_request(plugin, q["text"], q["image"], " " + q["answer"] + " it is", doc_id=i)
        mine, greedy = plugin.continuation_logprobs({**plugin._request(req, target=True), "sample_id": i})
        ref, cont = _reference_logprobs(plugin, req, None)
        assert torch.allclose(torch.tensor(mine), ref, atol=1e-5)
        assert plugin.loglikelihood_scores([req])[0] == (pytest.approx(-float(ref.sum()) / len(cont), abs=1e-5), greedy)


@pytest.mark.parametrize("use_fast_v", [True, False])
def test_loglikelihood_qwen_mrope_equals_full_sequence(tmp_path, use_fast_v):
    """(a), (b) on a tiny random Qwen2.5-VL: the continuation's M-RoPE positions through the pruned
    (or unpruned) cache == one forward of context + continuation (mask mode / the model)."""
    import numpy as np
    from PIL import Image

    from fastv_analysis.adapters import registry
    from fastv_analysis.lmms_model import FastV

    model = registry()["Qwen2_5_VLForConditionalGeneration"].tiny(tmp_path / "m", seed=2)
    Image.fromarray((np.random.default_rng(3).random((112, 196, 3)) * 255).astype("uint8")).save(tmp_path / "i.png")
    plugin = FastV(pretrained=str(model), agg_layer=2, keep=3, use_fast_v=use_fast_v, dtype="float32")
    req = _ll_request(plugin, "is there a cat?", str(tmp_path / "i.png"), " yes it is a cat")
    mine, _ = plugin.continuation_logprobs({**plugin._request(req, target=True), "sample_id": 0})
    ref, cont = _reference_logprobs(plugin, req, {"agg_layer": 2, "keep": 3} if use_fast_v else None, model=model)
    assert len(cont) > 3 and torch.allclose(torch.tensor(mine), ref, atol=1e-5)


def test_loglikelihood_greedy_flag(toy_plugins):
    """is_greedy: true exactly when every continuation token is the argmax (the pruned model's own
    greedy continuation is; the same with one more word is not)."""
    from fastv_analysis.samples import model_inputs

    plugin = toy_plugins[True]
    q = toy_questions(1, yes_no=True)[0]
    req = _ll_request(plugin, q["text"], q["image"], "")
    prepared = plugin._prepared({**plugin._request(req, target=True), "sample_id": 0})
    inputs = model_inputs(plugin.loaded, [prepared])
    with torch.inference_mode():
        out = plugin.pruned.generate(**inputs, max_new_tokens=3, do_sample=False)
    tokens = out[0, inputs["input_ids"].shape[1]:].tolist()
    text = plugin.loaded.processor.tokenizer.decode(tokens)
    assert plugin.continuation_ids(prepared.prompt, text) == tokens, text  # the test's premise
    assert plugin.loglikelihood_scores([_ll_request(plugin, q["text"], q["image"], text)])[0][1] is True
    assert plugin.loglikelihood_scores([_ll_request(plugin, q["text"], q["image"], text + " zebra")])[0][1] is False


MC_YAML = """dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
task: {task}
test_split: test
output_type: multiple_choice
doc_to_visual: !function utils.doc_to_visual
doc_to_text: !function utils.sqa_doc_to_text
doc_to_choice: "choices"
doc_to_target: "answer"
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
lmms_eval_specific_kwargs:
  default:
    format: default
    pre_prompt: ""
    post_prompt: ""
"""


def test_multiple_choice_task_through_lmms_eval(toy_plugins, tmp_path):
    """(c) a ScienceQA-shaped multiple_choice task (each option a continuation) runs through
    ``lmms-eval --model fastv``: its logged per-option losses == the plug-in's in this process,
    and its accuracy == the share of docs whose least-loss option is the answer."""
    sqa_file, _ = write_scienceqa(tmp_path, toy_questions(4, yes_no=False))
    tasks = write_tasks(tmp_path, 1)
    (tasks / "mc_local.yaml").write_text(MC_YAML.format(data=sqa_file, task="mc_local"))
    results = run_lmms_eval(tmp_path, TOY_DIR, tasks, "mc_local", f"agg_layer=2,keep={KEEP},dtype=float32")
    logged = {}
    for path in (tmp_path / "lmms-out").rglob("*_samples_mc_local.jsonl"):
        for line in path.read_text().splitlines():
            s = json.loads(line)
            logged[s["doc_id"]] = [float(r[0]) for r in s["filtered_resps"]]  # (loss, greedy) per option
    docs = [json.loads(line) for line in sqa_file.read_text().splitlines()]
    assert sorted(logged) == list(range(len(docs)))
    plugin, right = toy_plugins[True], 0
    from lmms_eval.tasks.scienceqa.utils import sqa_doc_to_text

    kwargs = {"format": "default", "pre_prompt": "", "post_prompt": ""}
    for i, doc in enumerate(docs):
        text = sqa_doc_to_text(doc, kwargs)
        mine = [plugin.loglikelihood_scores([_ll_request(plugin, text, doc["image"], " " + c, i)])[0][0]
                for c in doc["choices"]]
        assert mine == pytest.approx(logged[i], abs=1e-5)
        right += min(range(len(mine)), key=mine.__getitem__) == doc["answer"]
    assert results["results"]["mc_local"]["acc,none"] == pytest.approx(right / len(docs))
    print(results["results"]["mc_local"])


def test_loglikelihood_empty_continuation_is_refused(toy_plugins):
    """A continuation with no tokens is refused in one line naming the task and doc."""
    plugin = toy_plugins[True]
    q = toy_questions(1, yes_no=True)[0]
    with pytest.raises(ValueError, match=r"^task mc_local, doc 7: the continuation '' has no tokens$"):
        plugin.loglikelihood_scores([_ll_request(plugin, q["text"], q["image"], "", doc_id=7)])
