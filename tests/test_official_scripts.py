"""Default scoring equals each benchmark's official script, run on the answers files our code writes.

For each of the seven benchmarks :func:`build` writes a fixture in the benchmark's on-disk
layout (``test_tasks``' builders, plus tricky answers here) and the answers file the way
``eval`` writes it (``write_answer_files``). The official scripts were run by hand on exactly
these files (``python -c "from test_official_scripts import build; build(name, root)"``, then
the commands in each comment, Python 2 code through a ``2to3`` copy outside the repository);
the numbers they printed are the literals below. The scripts themselves are not vendored.

Sources (commit = the snapshot run):
- LLaVA: haotian-liu/LLaVA @ c121f0432da27facab705978f83c4ada465e46fd (``llava/eval/*``,
  ``scripts/convert_*``); MME's converter ``playground/data/eval/MME/convert_answer_to_mme.py``
  @ 5c134a57223b2874fce4703271424dd0bdec9055.
- VQAv2: GT-Vision-Lab/VQA @ a013f0043c1e2cdc995922dfe257f7149aa9af06 (``vqaEval.py``, ``vqa.py``).
- MME: BradyFU/Awesome-Multimodal-Large-Language-Models, branch Evaluation,
  ``tools/eval_tool.zip`` @ 1c1d69e138b57cf8b0400427927bfb8ed4285458 (``calculation.py``).
- GQA: the GQA ``eval.py`` with LLaVA's testdev patch (gist db6eddc2), as vendored in
  SHI-Labs/VCoder @ 2f95684dddff603383b18d59dd7153481a98863e
  (``playground/data/eval/gqa/data/eval/eval.py``).
- MMBench: open-compass/VLMEvalKit @ aca64dbb (``vlmeval/utils/matching_util.py`` ``can_infer``,
  ``vlmeval/dataset/utils/multiple_choice.py`` ``mcq_circular_eval`` with ``model=None``,
  i.e. exact matching), on the xlsx LLaVA's ``convert_mmbench_for_submission.py`` wrote.
"""

from __future__ import annotations

import json
from pathlib import Path

import polars as pl
import pytest

from fastv_analysis.cli.main import main
from fastv_analysis.evaluate import write_answer_files
from fastv_analysis.tasks import get_task
from test_tasks import (GQA, MMB, POPE_ANSWERS, SQA_ANSWERS, TEXTVQA, make_gqa, make_mmbench, make_mme,
                        make_pope, make_scienceqa, make_textvqa, png, write_json, write_jsonl)

SHORT = "\nAnswer the question using a single word or phrase."


def write_answers(root: Path, benchmark: str, data: Path, texts) -> Path:
    """The answers file ``eval`` writes for one configuration whose answers are ``texts``
    (``{question_id: text}`` or a list in question order)."""
    questions = get_task(benchmark).read(data, check_images=False)
    if isinstance(texts, dict):
        texts = [texts[q.question_id] for q in questions]
    pred = pl.DataFrame({"agg_layer": [2] * len(questions), "config": ["full"] * len(questions),
                         "keep": [576] * len(questions), "sample_id": list(range(len(questions))),
                         "question_id": [q.question_id for q in questions], "prediction": texts})
    write_answer_files(pred, questions, root / "answers", "tiny-llava")
    return root / "answers" / "K2_keep576_full.jsonl"


# ----------------------------------------------------------------------------------------
# Fixtures beyond test_tasks': VQAv2's tricky answers, MME's 14 subtasks, MMBench's refusals
# ----------------------------------------------------------------------------------------

VQAV2 = [  # (question_id, answer_type, human answers, prediction): old rule -> official rule
    (2001, "other", ["t-shirt"] * 10, "t-shirt"),                       # 1 -> 0: unanimous humans stay raw
    (2002, "other", ["mcdonald's"] * 4 + ["burger king"] * 6, "McDonald's"),  # 1 -> 0: "mcdonald 's" uploaded
    (2003, "number", ["2"] * 10, "two"),                                 # 1 -> 1: "2" uploaded
    (2004, "yes/no", ["Yes"] * 10, "yes"),                               # 1 -> 0: raw "Yes"
    (2005, "other", ["the dog"] * 10, "the dog"),                        # 1 -> 0: "dog" uploaded
    (2006, "other", ["the dog"] * 3 + ["dog"] * 7, "Dog."),              # 1 -> 1
    (2007, "number", ["2"] * 5 + ["two"] * 5, "2"),                      # 1 -> 1
    (2008, "other", ["coca-cola"] * 3 + ["coke"] * 7, "Coca-Cola"),      # 0.9 -> 0.9
    (2009, "other", ["coca cola"] * 10, "Coca-Cola"),                    # 1 -> 1
    (2010, "number", ["1,000"] * 4 + ["1000"] * 6, "1,000"),             # 1 -> 1
    (2011, "other", ["red"] + ["blue"] * 9, "red"),                      # 0.3 -> 0.3
    (2012, "other", ["Red"] * 2 + ["white"] * 8, "RED"),                 # 0.6 -> 0.6
    (2013, "number", ["none"] * 10, "none"),                             # 1 -> 0: "0" uploaded, raw "none"
    (2014, "number", ["10:30"] * 10, "10:30"),                           # 1 -> 1
    (2015, "other", ["cat's"] * 3 + ["dog"] * 7, "cat's"),               # 0.9 -> 0: "cat 's" vs "cat's"
    (2016, "yes/no", ["yes"] * 4 + ["no"] * 6, "Yes, it is"),            # 0 -> 0
]


def make_vqav2_tricky(root: Path) -> Path:
    base = root / "vqav2"
    head = {"info": {}, "task_type": "Open-Ended", "data_type": "mscoco", "data_subtype": "val2014",
            "license": {}}
    write_json(base / "v2_OpenEnded_mscoco_val2014_questions.json",
               {**head, "questions": [{"question_id": q, "image_id": q // 2, "question": f"Question {q}?"}
                                      for q, *_ in VQAV2]})
    write_json(base / "v2_mscoco_val2014_annotations.json",
               {**head, "annotations": [{"question_id": q, "image_id": q // 2, "answer_type": t,
                                         "question_type": "what", "multiple_choice_answer": h[0],
                                         "answers": [{"answer": a, "answer_confidence": "yes", "answer_id": k + 1}
                                                     for k, a in enumerate(h)]} for q, t, h, _ in VQAV2]})
    return base


MME_EXTRA = {  # subtask: (question 1 answer, question 2 answer) for one image; references Yes / No
    "count": ("Yes", "No"), "position": ("Yes", "Yes"), "color": ("No", "No"), "posters": ("yes", "no"),
    "celebrity": ("Yes", "Maybe"), "scene": ("No", "Yes"), "landmark": ("Yes", "No"), "OCR": ("Yes", "no."),
    "commonsense_reasoning": ("Yes", "No"), "numerical_calculation": ("I think yes", "No"),
    "text_translation": ("No", "No"),
}
MME_TEXTS = ["Yes", "No", "Yes, there is", "There is a bus", "yes", "No", "No", "Yes", "Yes", "NO."]  # test_tasks


def make_mme_full(root: Path) -> Path:
    """test_tasks' MME fixture plus one image in each of the other 11 subtasks (calculation.py reads all 14)."""
    base = make_mme(root)
    rows = [json.loads(x) for x in (base / "llava_mme.jsonl").read_text().splitlines()]
    for k, task in enumerate(MME_EXTRA):
        image = f"{k:03d}.png"
        png(base / "MME_Benchmark_release_version" / task / image)
        (base / "MME_Benchmark_release_version" / task / f"{k:03d}.txt").write_text(
            f"Is it {task} one? Please answer yes or no.\tYes\nIs it {task} two? Please answer yes or no.\tNo\n")
        rows += [{"question_id": f"{task}/{image}", "image": f"{task}/{image}", "text": f"Is it {task} {n}?{SHORT}",
                  "category": task} for n in ("one", "two")]
    write_jsonl(base / "llava_mme.jsonl", rows)
    return base


MMB_TRICKY = MMB + [  # VLMEvalKit's Z: a refusal or a standalone "Z" is wrong, never an option read by text
    (3, "Which pet?", "", ["cat", "dog"], "A", "attribute", "Z. cat", False),
    (1000003, "Which pet?", "", ["dog", "cat"], "B", "attribute", "B", True),
    (4, "Which toy?", "", ["ball", "kite"], "A", "attribute", "Cannot determine the answer, maybe a ball", False),
    (1000004, "Which toy?", "", ["kite", "ball"], "B", "attribute", "ball", True),
    (5, "Which fruit?", "", ["apple", "pear", "plum"], "C", "recognition", "I would say it is a plum", True),
    (1000005, "Which fruit?", "", ["pear", "plum", "apple"], "B", "recognition", "The answer is B", True),
    (2000005, "Which fruit?", "", ["plum", "apple", "pear"], "A", "recognition", "A plum", True),
]


def build(name: str, root: Path) -> tuple[Path, Path]:
    """(benchmark data, answers file as eval writes it) for benchmark ``name`` under ``root``."""
    root.mkdir(parents=True, exist_ok=True)
    if name == "scienceqa_img":
        data = make_scienceqa(root)
        return data, write_answers(root, name, data, SQA_ANSWERS)
    if name == "pope":
        data = make_pope(root)
        return data, write_answers(root, name, data, {str(k): v for k, v in POPE_ANSWERS.items()})
    if name == "mme":
        data = make_mme_full(root)
        extra = [t for pair in MME_EXTRA.values() for t in pair]
        return data, write_answers(root, name, data, MME_TEXTS + extra)
    if name == "gqa":
        data = make_gqa(root)
        return data, write_answers(root, name, data, {k: v[3] for k, v in GQA.items()})
    if name == "textvqa":
        data = make_textvqa(root)
        return data, write_answers(root, name, data, {str(t[0]): t[5] for t in TEXTVQA})
    if name == "vqav2":
        data = make_vqav2_tricky(root)
        return data, write_answers(root, name, data, {str(q): p for q, *_, p in VQAV2})
    if name == "mmbench":
        data = make_mmbench(root, MMB_TRICKY)
        return data, write_answers(root, name, data, {str(r[0]): r[6] for r in MMB_TRICKY})
    raise ValueError(name)


def score(tmp_path: Path, name: str) -> tuple[dict, list[dict]]:
    """``fastv-analyze score`` on the answers file eval writes: (metrics, the file's lines)."""
    data, answers = build(name, tmp_path)
    out = tmp_path / "metrics.json"
    assert main(["score", "--benchmark", name, "--data", str(data), "--answers", str(answers), "--out", str(out)]) == 0
    lines = [json.loads(x) for x in answers.read_text().splitlines()]
    assert all(set(x) >= {"question_id", "prompt", "text", "answer_id", "model_id", "metadata"} for x in lines)
    return json.loads(out.read_text())["metrics"], lines


# ----------------------------------------------------------------------------------------
# One test per benchmark: score == the official script's printed numbers on the same file
# ----------------------------------------------------------------------------------------

def test_scienceqa_equals_eval_science_qa(tmp_path):
    metrics, lines = score(tmp_path, "scienceqa_img")
    # LLaVA eval_science_qa.py --base-dir scienceqa --result-file K2_keep576_full.jsonl ... printed
    # "Total: 7, Correct: 3, Accuracy: 42.86%, IMG-Accuracy: 50.00%" (the text-only question 5 has no answer)
    assert metrics["img_accuracy"] == pytest.approx(50.00, abs=5e-3)
    assert all(x["prompt"].startswith("<image>\n") for x in lines)   # what it counts as an IMG question
    assert [x["question_id"] for x in lines] == ["1", "2", "3", "4", "6", "7"]   # "id" strings, as in the file


def test_pope_equals_eval_pope(tmp_path):
    metrics, lines = score(tmp_path, "pope")
    # LLaVA eval_pope.py --annotation-dir coco --question-file llava_pope_test.jsonl --result-file ... printed
    # (f1, acc, precision, recall, yes_ratio): adversarial 0.500 0.500 0.500 0.500 0.500;
    # random 1.000 1.000 1.000 1.000 0.667; popular 0.667 0.667 0.500 1.000 0.667
    official = {"adversarial": (0.5, 0.5, 0.5, 0.5, 0.5), "random": (1.0, 1.0, 1.0, 1.0, 2 / 3),
                "popular": (2 / 3, 2 / 3, 0.5, 1.0, 2 / 3)}
    for split, values in official.items():
        for metric, value in zip(("f1", "accuracy", "precision", "recall", "yes_ratio"), values):
            assert metrics[f"{split}/{metric}"] == pytest.approx(100 * value), (split, metric)
    assert metrics["mean/f1"] == pytest.approx(100 * (0.5 + 1.0 + 2 / 3) / 3)
    assert [x["question_id"] for x in lines] == list(range(1, 11))   # ints, as llava_pope_test.jsonl has them


def test_mme_equals_calculation(tmp_path):
    metrics, lines = score(tmp_path, "mme")
    # LLaVA's convert_answer_to_mme.py --experiment fx, then MME eval_tool calculation.py --results_dir answers/fx:
    # "Perception total score: 1175.0", "Cognition total score: 500.0"; per subtask as below
    official = {"existence": 125, "count": 200, "position": 50, "color": 50, "posters": 200, "celebrity": 50,
                "scene": 0, "landmark": 200, "artwork": 100, "OCR": 200, "commonsense_reasoning": 200,
                "numerical_calculation": 50, "text_translation": 50, "code_reasoning": 200}
    assert (metrics["perception"], metrics["cognition"]) == pytest.approx((1175.0, 500.0))
    assert {t: metrics[f"{t}/score"] for t in official} == pytest.approx(official)
    assert lines[0]["question_id"] == "existence/000000000001.jpg"   # LLaVA's id, shared by the image's two lines


def test_gqa_equals_gqa_eval(tmp_path):
    metrics, lines = score(tmp_path, "gqa")
    # LLaVA convert_gqa_for_eval.py, then GQA eval.py --tier testdev_balanced printed
    # "Binary: 100.00%", "Open: 66.67%", "Accuracy: 80.00%", structural logical 100.00 / query 66.67 /
    # verify 100.00, semantic attr 50.00 / cat 100.00 / obj 100.00 / rel 100.00
    assert (metrics["accuracy"], metrics["binary/accuracy"], metrics["open/accuracy"]) == pytest.approx(
        (80.0, 100.0, 66.67), abs=5e-3)
    assert metrics["structural:query/accuracy"] == pytest.approx(66.67, abs=5e-3)
    assert metrics["semantic:attr/accuracy"] == pytest.approx(50.0)
    assert [x["question_id"] for x in lines] == list(GQA)   # strings, as in llava_gqa_testdev_balanced.jsonl


def test_textvqa_equals_m4c_evaluator(tmp_path):
    metrics, lines = score(tmp_path, "textvqa")
    # LLaVA python -m llava.eval.eval_textvqa --annotation-file TextVQA_0.5.1_val.json --result-file ...:
    # "Samples: 5", "Accuracy: 56.00%"
    assert metrics["accuracy"] == pytest.approx(56.00, abs=5e-3)
    assert [x["question_id"] for x in lines] == ["img1", "img1", "img2", "img3", "img3"]   # image ids, with prompts


def test_vqav2_equals_vqaeval_on_llava_upload(tmp_path):
    metrics, lines = score(tmp_path, "vqav2")
    # LLaVA convert_vqav2_for_submission.py (uploads "t shirt", "mcdonald 's", "0", "cat 's", ...), then
    # GT-Vision-Lab/VQA vqaEval.py (2to3 copy): "Overall Accuracy is: 48.75", number 80.00, other 42.22,
    # yes/no 0.00; per question 2001..2016: 0 0 100 0 0 100 100 90 100 100 30 60 0 100 0 0
    # (the old rule, EvalAI normalisation on both sides, said 85.63 here)
    assert metrics["accuracy"] == pytest.approx(48.75, abs=5e-3)
    assert (metrics["number/accuracy"], metrics["other/accuracy"], metrics["yes/no/accuracy"]) == pytest.approx(
        (80.0, 42.22, 0.0), abs=5e-3)
    assert [x["question_id"] for x in lines] == [q for q, *_ in VQAV2]   # ints: the converter looks them up


def test_mmbench_equals_vlmevalkit_exact_matching(tmp_path):
    metrics, lines = score(tmp_path, "mmbench")
    # LLaVA convert_mmbench_for_submission.py filled 16 of 16 predictions; VLMEvalKit @ aca64dbb can_infer on
    # them: "Z. cat" -> Z, "Cannot determine the answer, maybe a ball" -> Z, "A or B" -> False, "I would say
    # it is a plum" -> C, "The answer is B" -> B, "A plum" -> A, "dog" -> C, "triangle" -> B;
    # mcq_circular_eval(model=None): hits 1 0 1 0 0 1 for groups 0..5 -> circular accuracy 50.0
    assert metrics["circular_accuracy"] == pytest.approx(50.0)
    assert metrics["accuracy"] == pytest.approx(400 / 6)   # single pass: the can_infer letters of rows 0..5
    assert (metrics["n_refused"], metrics["n_unmatched"]) == (2, 1)
    first = lines[0]
    assert (first["question_id"], first["round_id"], first["option_char"]) == (0, 0, ["A", "B", "C", "D"])
    assert first["prompt"] == "What animal?\nA. cat\nB. dog\nC. bird\nD. fish"   # model_vqa_mmbench's cur_prompt
