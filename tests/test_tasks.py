"""Standard benchmarks (fastv_analysis.tasks): each reader on a small fixture written in the
benchmark's exact on-disk layout, each metric against values computed by hand (the
arithmetic is in the comments), the answers reader's errors, ``detect``, and the ``score`` CLI.
"""

from __future__ import annotations

import base64
import io
import json
from pathlib import Path

import pytest
from PIL import Image

from fastv_analysis.cli.main import main
from fastv_analysis.tasks import TASKS, detect, get_task, read_answers
from fastv_analysis.tasks.mmbench import match_option
from fastv_analysis.tasks.pope import parse_yes_no as pope_yes_no
from fastv_analysis.tasks.scienceqa import parse_letter
from fastv_analysis.tasks.vqa_accuracy import normalize_answer, soft_accuracy, vqav2_accuracy

SHORT = "\nAnswer the question using a single word or phrase."
LETTER = "\nAnswer with the option's letter from the given choices directly."


def png(path: Path, color=(200, 30, 30)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (4, 4), color).save(path)
    return path


def write_json(path: Path, obj) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj), encoding="utf-8")
    return path


def write_jsonl(path: Path, rows) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def score_cli(data: Path, answers: Path, out: Path, *extra: str) -> dict:
    assert main(["score", "--data", str(data), "--answers", str(answers), "--out", str(out), *extra]) == 0
    return json.loads(out.read_text())


# ----------------------------------------------------------------------------------------
# ScienceQA-IMG
# ----------------------------------------------------------------------------------------

SQA = {  # id: (choices, answer index, has image, subject)
    "1": (["cat", "dog", "bird"], 1, True, "natural science"),
    "2": (["red", "blue"], 0, True, "natural science"),
    "3": (["x", "y", "z", "w"], 2, True, "social science"),
    "4": (["p", "q"], 1, True, "language science"),
    "5": (["yes", "no"], 0, False, "language science"),
    "6": (["a1", "a2", "a3"], 0, True, "social science"),
    "7": (["m", "n"], 1, True, "natural science"),
}
SQA_ANSWERS = {
    "1": "The answer is B.",                         # B = index 1 = answer: right
    "2": "The answer is A. The answer is B.",        # two "The answer is X." -> FAILED: wrong
    "3": "C",                                        # bare letter: right
    "4": "B. q",                                     # "X. " prefix: right
    "5": "A",                                        # text-only question: not part of IMG, passed over
    "6": "D",                                        # D is beyond its 3 choices: wrong
    "7": "The answer is B",                          # the pattern needs a character after the letter: FAILED
}


def make_scienceqa(root: Path) -> Path:
    base = root / "scienceqa"
    problems, entries = {}, []
    for pid, (choices, answer, has_image, subject) in SQA.items():
        problems[pid] = {"question": f"q{pid}?", "choices": choices, "answer": answer, "subject": subject,
                         "image": "image.png" if has_image else None, "hint": "", "split": "test"}
        options = "\n".join(f"{'ABCDE'[i]}. {c}" for i, c in enumerate(choices))
        entry = {"id": pid, "conversations": [{"from": "human", "value": f"Context: N/A\nq{pid}?\n{options}"},
                                              {"from": "gpt", "value": "A"}]}
        if has_image:
            entry["image"] = f"{pid}/image.png"
            entry["conversations"][0]["value"] += "\n<image>"
            png(base / "images" / "test" / pid / "image.png")
        entries.append(entry)
    write_json(base / "problems.json", problems)
    write_json(base / "pid_splits.json", {"test": list(SQA), "train": []})
    write_json(base / "llava_test_CQM-A.json", entries)
    write_jsonl(root / "sqa_answers.jsonl", [{"question_id": k, "prompt": "p", "text": v, "answer_id": "x",
                                              "model_id": "m", "metadata": {}} for k, v in SQA_ANSWERS.items()])
    return base


def test_scienceqa_parse_letter():
    assert parse_letter("B") == "B"
    assert parse_letter("B. dog") == "B"
    assert parse_letter("The answer is C.") == "C"
    assert parse_letter("The answer is C. The answer is D.") == "FAILED"  # exactly one required
    assert parse_letter("The answer is C") == "FAILED"                     # "." needs a character
    assert parse_letter("The answer is C. No, the answer is D.") == "C"   # case-sensitive: one match
    assert parse_letter("b") == "FAILED"                                   # case matters
    assert parse_letter("(B)") == "FAILED"


def test_scienceqa_reads_img_questions_and_scores(tmp_path):
    base = make_scienceqa(tmp_path)
    task = get_task("scienceqa_img")
    questions = task.read(base)
    assert [q.question_id for q in questions] == ["1", "2", "3", "4", "6", "7"]  # "5" has no image
    q1 = questions[0]
    assert q1.text == "Context: N/A\nq1?\nA. cat\nB. dog\nC. bird" + LETTER
    assert q1.image == base / "images" / "test" / "1" / "image.png"
    assert (q1.answer, q1.choices, q1.category) == (1, ["cat", "dog", "bird"], "natural science")
    result = task.score(questions, read_answers(tmp_path / "sqa_answers.jsonl", questions))
    # right: 1, 3, 4 of the six IMG questions -> 3/6 = 50 %; FAILED: 2 and 7
    assert result.headline == ("img_accuracy", pytest.approx(50.0))
    m = result.metrics
    assert m["n"] == 6 and m["n_failed"] == 2
    assert m["natural science/accuracy"] == pytest.approx(100 / 3)   # 1 right, 2 and 7 wrong
    assert m["social science/accuracy"] == pytest.approx(50.0)       # 3 right, 6 wrong
    assert m["language science/accuracy"] == pytest.approx(100.0)    # 4 right
    pq = {r["question_id"]: r for r in result.per_question.iter_rows(named=True)}
    assert [pq[i]["correct"] for i in ("1", "2", "3", "4", "6", "7")] == [True, False, True, True, False, False]
    assert pq["6"]["parsed"] == "D" and pq["7"]["parsed"] == "FAILED"


def test_scienceqa_appends_the_letter_suffix_once(tmp_path):
    base = make_scienceqa(tmp_path)
    entries = json.loads((base / "llava_test_CQM-A.json").read_text())
    entries[0]["conversations"][0]["value"] = "<image>\nContext: N/A\nq1?\nA. cat\nB. dog\nC. bird" + LETTER
    write_json(base / "llava_test_CQM-A.json", entries)
    first, second = get_task("scienceqa_img").read(base)[:2]
    assert first.text == "Context: N/A\nq1?\nA. cat\nB. dog\nC. bird" + LETTER   # already there: kept once
    assert second.text.endswith("B. blue" + LETTER) and second.text.count(LETTER.strip()) == 1  # appended


def test_scienceqa_errors(tmp_path):
    base = make_scienceqa(tmp_path)
    task = get_task("scienceqa_img")
    (base / "images" / "test" / "3" / "image.png").unlink()
    with pytest.raises(FileNotFoundError, match=r"images/test/3/image.png"):
        task.read(base)
    assert len(task.read(base, check_images=False)) == 6
    write_json(base / "pid_splits.json", {"test": ["1", "2"]})
    with pytest.raises(ValueError, match="id 3 is not in the test split"):
        task.read(base, check_images=False)
    (base / "problems.json").unlink()
    with pytest.raises(FileNotFoundError, match="problems.json"):
        task.read(base, check_images=False)


# ----------------------------------------------------------------------------------------
# POPE
# ----------------------------------------------------------------------------------------

# (llava question_id, split, image, object, label); the question file interleaves the splits
POPE = [(1, "adversarial", "a1", "dog", "yes"), (2, "popular", "p1", "cup", "yes"),
        (3, "adversarial", "a2", "cat", "no"), (4, "random", "r1", "car", "yes"),
        (5, "adversarial", "a3", "bus", "yes"), (6, "popular", "p2", "pen", "no"),
        (7, "random", "r2", "man", "yes"), (8, "adversarial", "a4", "cow", "no"),
        (9, "popular", "p3", "hat", "no"), (10, "random", "r3", "box", "no")]
POPE_ANSWERS = {
    1: "Yes, there is a dog.",    # yes, label yes: TP
    3: "No.",                     # no, label no: TN
    5: "There is not a cat. Yes.",  # first sentence has "not" -> no, label yes: FN
    8: "Yes",                     # yes, label no: FP
    2: "yes",                     # TP
    6: "No, there is none.",      # "No" -> no: TN
    9: "Nope.",                   # "Nope" is not No/not/no -> yes, label no: FP
    4: "Yes.",                    # TP
    7: "NO",                      # "NO" is not No/not/no -> yes, label yes: TP
    10: "no",                     # TN
}


def make_pope(root: Path) -> Path:
    base = root / "pope"
    rows = [{"question_id": qid, "image": f"COCO_val2014_{img}.jpg", "text": f"Is there a {obj} in the image?{SHORT}",
             "category": split} for qid, split, img, obj, _ in POPE]
    write_jsonl(base / "llava_pope_test.jsonl", rows)
    for split in ("adversarial", "popular", "random"):
        lines = [(qid, img, obj, label) for qid, s, img, obj, label in POPE if s == split]
        # adversarial labels carry the same ids as the question file; the others their own 1..n
        write_jsonl(base / "coco" / f"coco_pope_{split}.json",
                    [{"question_id": qid if split == "adversarial" else k + 1, "image": f"COCO_val2014_{img}.jpg",
                      "text": f"Is there a {obj} in the image?", "label": label}
                     for k, (qid, img, obj, label) in enumerate(lines)])
    for _, _, img, _, _ in POPE:
        png(base / "val2014" / f"COCO_val2014_{img}.jpg")
    # answers in reverse file order: labels follow the question file, not the answer order
    write_jsonl(root / "pope_answers.jsonl",
                [{"question_id": qid, "prompt": "p", "text": POPE_ANSWERS[qid]} for qid, *_ in reversed(POPE)])
    return base


def test_pope_parse():
    assert pope_yes_no("No, it is not.") == "no"
    assert pope_yes_no("Yes. There is no cat.") == "yes"   # only the first sentence counts
    assert pope_yes_no("Nope") == "yes" and pope_yes_no("NO") == "yes"
    assert pope_yes_no("There is not") == "no"


def test_pope_labels_by_position_per_split_and_metrics(tmp_path):
    base = make_pope(tmp_path)
    task = get_task("pope")
    questions = task.read(base)
    assert [q.answer for q in questions] == [label for *_, label in POPE]
    assert [q.category for q in questions] == [split for _, split, *_ in POPE]
    result = task.score(questions, read_answers(tmp_path / "pope_answers.jsonl", questions))
    m = result.metrics
    # adversarial: TP 1 (q1) FP 1 (q8) TN 1 (q3) FN 1 (q5): P = R = F1 = acc = 1/2, yes-ratio 2/4
    assert (m["adversarial/tp"], m["adversarial/fp"], m["adversarial/tn"], m["adversarial/fn"]) == (1, 1, 1, 1)
    assert m["adversarial/f1"] == pytest.approx(50.0) and m["adversarial/yes_ratio"] == pytest.approx(50.0)
    # popular: TP 1 (q2) FP 1 (q9) TN 1 (q6): P = 1/2, R = 1/1, F1 = 2(.5)(1)/1.5 = 2/3, acc 2/3, yes 2/3
    assert m["popular/precision"] == pytest.approx(50.0) and m["popular/recall"] == pytest.approx(100.0)
    assert m["popular/f1"] == pytest.approx(200 / 3) and m["popular/accuracy"] == pytest.approx(200 / 3)
    # random: TP 2 (q4, q7) TN 1 (q10): P = R = F1 = acc = 1, yes-ratio 2/3
    assert m["random/f1"] == pytest.approx(100.0) and m["random/yes_ratio"] == pytest.approx(200 / 3)
    # means over the three splits
    assert result.headline == ("mean/f1", pytest.approx((50 + 200 / 3 + 100) / 3))        # 72.22
    assert m["mean/accuracy"] == pytest.approx((50 + 200 / 3 + 100) / 3)
    assert m["mean/precision"] == pytest.approx((50 + 50 + 100) / 3)                     # 66.67
    assert m["mean/recall"] == pytest.approx((50 + 100 + 100) / 3)                       # 83.33
    assert m["mean/yes_ratio"] == pytest.approx((50 + 200 / 3 + 200 / 3) / 3)            # 61.11


def test_pope_misaligned_labels_fail_with_one_line(tmp_path):
    base = make_pope(tmp_path)
    task = get_task("pope")
    label_file = base / "coco" / "coco_pope_adversarial.json"
    lines = label_file.read_text().splitlines()
    # same ids, order swapped (and texts/images stripped): the id check catches it
    swapped = [json.loads(lines[i]) for i in (1, 0, 2, 3)]
    write_jsonl(label_file, [{"question_id": r["question_id"], "label": r["label"]} for r in swapped])
    with pytest.raises(ValueError, match=r"coco_pope_adversarial.json:1: labels out of step: question ids 3 and 1"):
        task.read(base, check_images=False)
    # a label file one line short
    write_jsonl(label_file, [json.loads(x) for x in lines[:3]])
    with pytest.raises(ValueError, match="3 labels for 4 'adversarial' questions"):
        task.read(base, check_images=False)
    # texts out of step (popular ids are their own numbering, so texts/images are what is compared)
    write_jsonl(label_file, [json.loads(x) for x in lines])
    pop = base / "coco" / "coco_pope_popular.json"
    rows = [json.loads(x) for x in pop.read_text().splitlines()]
    write_jsonl(pop, [rows[0], {**rows[1], "text": "Is there a hat in the image?"}, rows[2]])
    with pytest.raises(ValueError, match="labels out of step: questions"):
        task.read(base, check_images=False)
    (pop).unlink()
    with pytest.raises(FileNotFoundError, match="coco_pope_popular.json"):
        task.read(base, check_images=False)


# ----------------------------------------------------------------------------------------
# MME
# ----------------------------------------------------------------------------------------

def make_mme(root: Path) -> Path:
    base = root / "MME"
    rel = base / "MME_Benchmark_release_version"
    # existence: flat folder (image + <stem>.txt side by side)
    qa = {("existence", "000000000001.jpg"): [("Is there a dog in this image?", "Yes"),
                                              ("Is there a cat in this image?", "No")],
          ("existence", "000000000002.jpg"): [("Is there a car in this image?", "Yes"),
                                              ("Is there a bus in this image?", "No")],
          ("artwork", "10002.jpg"): [("Is this artwork created by Monet?", "Yes"),
                                     ("Is this artwork created by Dali?", "No")],
          ("artwork", "10003.jpg"): [("Is this artwork titled Sunrise?", "Yes"),
                                     ("Is this artwork titled Night?", "No")],
          ("code_reasoning", "0020.png"): [("Is a python code shown in the picture?", "Yes"),
                                           ("Is a java code shown in the picture?", "No")]}
    rows = []
    for (task, image), pairs in qa.items():
        nested = task == "artwork"  # artwork: images/ + questions_answers_YN/
        png(rel / task / ("images" if nested else "") / image)
        txt = rel / task / ("questions_answers_YN" if nested else "") / (image.split(".")[0] + ".txt")
        lines = []
        for question, answer in pairs:
            # the release has two spaces before "Please" in some files: Monet's line here
            sep = "  " if "Monet" in question else " "
            lines.append(f"{question}{sep}Please answer yes or no.\t{answer}")
            rows.append({"question_id": f"{task}/{image}", "image": f"{task}/{image}",
                         "text": question + SHORT, "category": task})
        txt.parent.mkdir(parents=True, exist_ok=True)
        txt.write_text("\n".join(lines) + "\n")
    write_jsonl(base / "llava_mme.jsonl", rows)
    texts = [  # LLaVA answers: the id is per image, the prompt tells the two questions apart
        "Yes", "No",                 # existence 1: both right
        "Yes, there is", "There is a bus",  # existence 2: "yes," -> yes right; "ther" -> other: wrong
        "yes", "No",                 # artwork 10002: both right
        "No", "Yes",                 # artwork 10003: both wrong
        "Yes", "NO.",                # code_reasoning: "no." has "no" in its first 4 characters: right
    ]
    write_jsonl(root / "mme_answers.jsonl", [{"question_id": r["question_id"], "prompt": r["text"], "text": t}
                                            for r, t in zip(rows, texts)])
    return base


def test_mme_reads_release_layouts_and_scores(tmp_path):
    base = make_mme(tmp_path)
    task = get_task("mme")
    questions = task.read(base)
    assert len(questions) == 10
    assert questions[0].question_id == "existence/000000000001.jpg#1"
    assert questions[5].question_id == "artwork/10002.jpg#2"
    assert questions[4].image == base / "MME_Benchmark_release_version" / "artwork" / "images" / "10002.jpg"
    assert [q.answer for q in questions] == ["Yes", "No"] * 5
    result = task.score(questions, read_answers(tmp_path / "mme_answers.jsonl", questions))
    m = result.metrics
    # existence: acc 3/4 = 75, acc+ 1/2 images = 50 -> 125
    assert (m["existence/acc"], m["existence/acc_plus"], m["existence/score"]) == pytest.approx((75, 50, 125))
    # artwork: acc 2/4 = 50, acc+ 1/2 = 50 -> 100
    assert m["artwork/score"] == pytest.approx(100)
    # code_reasoning: 2/2 and 1/1 -> 200
    assert m["code_reasoning/score"] == pytest.approx(200)
    assert result.headline == ("perception", pytest.approx(225))    # existence + artwork
    assert m["cognition"] == pytest.approx(200)
    assert m["existence/n_other"] == 1


def test_mme_answers_need_prompt_and_reference(tmp_path):
    base = make_mme(tmp_path)
    task = get_task("mme")
    questions = task.read(base)
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"question_id": "existence/000000000001.jpg", "text": "Yes"}])
    with pytest.raises(ValueError, match="bad.jsonl:1: question_id existence/000000000001.jpg is shared"):
        read_answers(bad, questions)
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"question_id": "existence/000000000001.jpg", "prompt": "Other?",
                                                "text": "Yes"}])
    with pytest.raises(ValueError, match="no question with id existence/000000000001.jpg has this prompt"):
        read_answers(bad, questions)
    txt = base / "MME_Benchmark_release_version" / "existence" / "000000000002.txt"
    txt.write_text("Is there a car in this image? Please answer yes or no.\tYes\n")
    with pytest.raises(ValueError, match=r"llava_mme.jsonl:4: no reference for 'Is there a bus"):
        task.read(base)


# ----------------------------------------------------------------------------------------
# GQA
# ----------------------------------------------------------------------------------------

GQA = {  # id: (answer, structural, semantic, prediction, right?)
    "201": ("yes", "verify", "attr", "Yes.", True),          # rstrip(".") + lower -> "yes"
    "202": ("left", "query", "rel", "Left", True),
    "203": ("white", "query", "attr", "The white one", False),
    "204": ("no", "logical", "obj", "no..", True),           # every trailing "." goes
    "205": ("table", "query", "cat", "table.", True),
}


def make_gqa(root: Path) -> Path:
    base = root / "gqa"
    write_jsonl(base / "llava_gqa_testdev_balanced.jsonl",
                [{"question_id": k, "image": f"n{k}.jpg", "text": f"Question {k}?{SHORT}", "category": "default"}
                 for k in GQA])
    write_json(base / "data" / "testdev_balanced_questions.json",
               {k: {"imageId": f"n{k}", "question": f"Question {k}?", "answer": a, "isBalanced": True,
                    "types": {"structural": s, "semantic": sem, "detailed": "x"}, "semantic": [],  # GQA's own eval.py
                    "groups": {"global": a if s == "query" else None, "local": f"{s}-{sem}"}}  # reads these two
                for k, (a, s, sem, _, _) in GQA.items()})
    for k in GQA:
        png(base / "data" / "images" / f"n{k}.jpg")
    write_jsonl(root / "gqa_answers.jsonl", [{"question_id": k, "text": v[3]} for k, v in GQA.items()])
    return base


def test_gqa_exact_match(tmp_path):
    base = make_gqa(tmp_path)
    task = get_task("gqa")
    questions = task.read(base)
    assert questions[0].image == base / "data" / "images" / "n201.jpg"
    assert questions[0].text == f"Question 201?{SHORT}" and questions[0].category == "verify"
    result = task.score(questions, read_answers(tmp_path / "gqa_answers.jsonl", questions))
    m = result.metrics
    assert result.headline == ("accuracy", pytest.approx(80.0))           # 4 of 5 (203 wrong)
    assert m["binary/accuracy"] == pytest.approx(100.0)                   # 201, 204
    assert m["open/accuracy"] == pytest.approx(200 / 3)                   # 202, 205 of 202, 203, 205
    assert m["semantic:attr/accuracy"] == pytest.approx(50.0)             # 201 right, 203 wrong
    assert m["structural:query/accuracy"] == pytest.approx(200 / 3)


# ----------------------------------------------------------------------------------------
# TextVQA and VQAv2 (soft accuracy, EvalAI normalisation)
# ----------------------------------------------------------------------------------------

def test_vqa_normalisation_and_soft_accuracy():
    assert normalize_answer("Two.") == "2"                  # period dropped, number word -> digit
    assert normalize_answer("the cat's") == "cat 's"        # article dropped, 's split off
    assert normalize_answer("cats") == "cats"               # ... so "the cat's" != "cats"
    assert normalize_answer("Coca-Cola") == "coca cola"     # "-" not touching a space -> space
    assert normalize_answer("x - y") == "x y"               # touching a space -> deleted
    assert normalize_answer("dont") == "don't"              # contraction table
    assert normalize_answer("1.5") == "1.5"                 # a period before a digit stays
    # c of ten humans equal: 1 -> 0.3, 2 -> 0.6, 3 -> 0.9, 4 -> 1 (leave-one-out mean)
    for c, expected in ((0, 0.0), (1, 0.3), (2, 0.6), (3, 0.9), (4, 1.0), (10, 1.0)):
        assert soft_accuracy("a", ["a"] * c + ["b"] * (10 - c)) == pytest.approx(expected)
    with pytest.raises(ValueError, match="ten human answers"):
        soft_accuracy("a", ["a"] * 9)


def test_vqav2_rule_is_vqaeval_on_the_uploaded_answer():
    """EvalAI processing on the prediction only; humans raw when unanimous, else vqaEval's own steps
    (the values vqaEval.py printed for these answers: tests/test_official_scripts.py)."""
    assert vqav2_accuracy("t-shirt", ["t-shirt"] * 10) == 0.0                 # uploaded "t shirt"
    assert soft_accuracy("t-shirt", ["t-shirt"] * 10) == 1.0                  # TextVQA's m4c rule: both sides
    assert vqav2_accuracy("McDonald's", ["mcdonald's"] * 4 + ["burger king"] * 6) == 0.0   # "mcdonald 's"
    assert vqav2_accuracy("none", ["none"] * 10) == 0.0                       # uploaded "0", humans raw
    assert vqav2_accuracy("Coca-Cola", ["coca-cola"] * 3 + ["coke"] * 7) == pytest.approx(0.9)
    assert vqav2_accuracy("1,000", ["1,000"] * 4 + ["1000"] * 6) == 1.0
    with pytest.raises(ValueError, match="ten human answers"):
        vqav2_accuracy("a", ["a"] * 9)


TEXTVQA = [  # (question_id, image, question, prompt form, human answers, prediction, expected score)
    (34602, "img1", "What is the brand of this camera?", "ocr",
     ["dakota"] * 2 + ["Dakota."] + ["dakota digital"] * 7, "Dakota", 0.9),    # 3 equal after normalising
    (34603, "img1", "How many bottles are there?", "plain",
     ["2", "two"] + ["3"] * 8, "Two.", 0.6),                                     # "two" -> "2": 2 equal
    (34604, "img2", "Whose bag is this?", "ocr",
     ["cat's"] * 4 + ["the cats"] * 6, "the cat's", 1.0),                        # "cat 's" x4; "cats" no
    (34605, "img3", "What does the sign say?", "ocr-first",
     ["stop"] + ["STOP sign"] * 9, "stop", 0.3),                                 # 1 equal
    (34606, "img3", "What is written?", "plain", ["hello world"] * 10, "goodbye", 0.0),
]


def make_textvqa(root: Path) -> Path:
    base = root / "textvqa"
    data, rows = [], []
    for qid, img, question, form, human, _, _ in TEXTVQA:
        data.append({"question_id": qid, "image_id": img, "question": question.lower(), "answers": human,
                     "image_classes": [], "set_name": "val"})
        text = {"ocr": f"{question}\nReference OCR token: a, b{SHORT}", "plain": f"{question}{SHORT}",
                "ocr-first": f"Reference OCR token: STOP\n{question}{SHORT}"}[form]
        rows.append({"question_id": img, "image": f"{img}.jpg", "text": text, "category": "default"})
        png(base / "train_images" / f"{img}.jpg")
    write_json(base / "TextVQA_0.5.1_val.json", {"dataset_name": "textvqa", "dataset_version": "0.5.1", "data": data})
    write_jsonl(base / "llava_textvqa_val_v051_ocr.jsonl", rows)
    write_jsonl(root / "textvqa_answers.jsonl", [{"question_id": r["question_id"], "prompt": r["text"], "text": t[5]}
                                                for r, t in zip(rows, TEXTVQA)])
    return base


def test_textvqa_matches_by_image_and_question(tmp_path):
    base = make_textvqa(tmp_path)
    task = get_task("textvqa")
    questions = task.read(base)
    assert [q.question_id for q in questions] == [str(t[0]) for t in TEXTVQA]
    assert questions[0].meta["llava_question_id"] == "img1" and len(questions[0].meta["answers"]) == 10
    result = task.score(questions, read_answers(tmp_path / "textvqa_answers.jsonl", questions))
    scores = dict(zip(result.per_question["question_id"], result.per_question["score"]))
    assert [scores[str(t[0])] for t in TEXTVQA] == pytest.approx([t[6] for t in TEXTVQA])
    assert result.headline == ("accuracy", pytest.approx(100 * (0.9 + 0.6 + 1.0 + 0.3 + 0) / 5))  # 56.0
    # an annotation missing for a line: one line naming the image and question
    data = json.loads((base / "TextVQA_0.5.1_val.json").read_text())
    data["data"] = data["data"][1:]
    write_json(base / "TextVQA_0.5.1_val.json", data)
    with pytest.raises(ValueError, match=r"llava_textvqa_val_v051_ocr.jsonl:1: no annotation .* image img1"):
        task.read(base)


VQAV2 = [  # (question_id, image_id, question, answer_type, human answers, prediction, expected score)
    (1001, 42, "What color is the cat?", "other", ["white"] * 5 + ["gray"] * 5, "White.", 1.0),
    (1002, 42, "How many dogs?", "number", ["2"] * 2 + ["3"] * 8, "two", 0.6),
    (1003, 43, "Is it sunny?", "yes/no", ["yes"] * 3 + ["no"] * 7, "Yes", 0.9),
    (1004, 43, "What is he holding?", "other", ["umbrella", "an umbrella", "an umbrella"] + ["bag"] * 7,
     "the umbrella", 0.9),                      # all three normalise to "umbrella"
]


def make_vqav2(root: Path) -> Path:
    base = root / "vqav2"
    write_json(base / "v2_OpenEnded_mscoco_val2014_questions.json",
               {"data_subtype": "val2014", "questions": [{"question_id": q, "image_id": i, "question": t}
                                                          for q, i, t, *_ in VQAV2]})
    write_json(base / "v2_mscoco_val2014_annotations.json",
               {"annotations": [{"question_id": q, "image_id": i, "answer_type": at, "question_type": "what",
                                 "multiple_choice_answer": h[0],
                                 "answers": [{"answer": a, "answer_confidence": "yes", "answer_id": k + 1}
                                             for k, a in enumerate(h)]} for q, i, _, at, h, _, _ in VQAV2]})
    for image_id in (42, 43):
        png(base / "val2014" / f"COCO_val2014_{image_id:012d}.jpg")
    write_jsonl(root / "vqav2_answers.jsonl", [{"question_id": q, "text": p} for q, *_, p, _ in VQAV2])
    return base


def test_vqav2_soft_accuracy_per_answer_type(tmp_path):
    base = make_vqav2(tmp_path)
    task = get_task("vqav2")
    questions = task.read(base)
    assert questions[0].text == "What color is the cat?" + SHORT
    assert questions[0].image == base / "val2014" / "COCO_val2014_000000000042.jpg"
    result = task.score(questions, read_answers(tmp_path / "vqav2_answers.jsonl", questions))
    m = result.metrics
    assert result.headline == ("accuracy", pytest.approx(100 * (1.0 + 0.6 + 0.9 + 0.9) / 4))  # 85.0
    assert m["other/accuracy"] == pytest.approx(95.0)      # (1.0 + 0.9) / 2
    assert m["number/accuracy"] == pytest.approx(60.0)
    assert m["yes/no/accuracy"] == pytest.approx(90.0)
    assert result.per_question["correct"].to_list() == [True, False, True, True]  # >= 3 humans agree


# ----------------------------------------------------------------------------------------
# MMBench
# ----------------------------------------------------------------------------------------

def _b64_png(color) -> str:
    buf = io.BytesIO()
    Image.new("RGB", (4, 4), color).save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


# (index, question, hint, options, answer, category, prediction, right?)
MMB = [
    (0, "What animal?", "", ["cat", "dog", "bird", "fish"], "B", "recognition", "B", True),
    (1000000, "What animal?", "", ["dog", "bird", "fish", "cat"], "A", "recognition", "A. dog", True),
    (2000000, "What animal?", "", ["bird", "fish", "cat", "dog"], "D", "recognition", "The answer is D", True),
    (3000000, "What animal?", "", ["fish", "cat", "dog", "bird"], "C", "recognition", "dog", True),  # by text
    (1, "Is it day?", "Look at the sky.", ["yes", "no"], "A", "attribute", "A", True),
    (1000001, "Is it day?", "Look at the sky.", ["no", "yes"], "B", "attribute", "A or B", False),  # 2 letters
    (2, "Which shape?", "", ["circle", "square", "triangle"], "C", "recognition", "C", True),
    (1000002, "Which shape?", "", ["square", "triangle", "circle"], "B", "recognition", "triangle", True),
    (2000002, "Which shape?", "", ["triangle", "circle", "square"], "A", "recognition", "(A)", True),
]


def make_mmbench(root: Path, rows=MMB) -> Path:
    header = ["index", "question", "hint", "A", "B", "C", "D", "answer", "category", "source", "l2-category",
              "comment", "split", "image"]
    lines = ["\t".join(header)]
    for k, (index, question, hint, options, answer, category, _, _) in enumerate(rows):
        opts = options + [""] * (4 - len(options))
        lines.append("\t".join([str(index), question, hint, *opts, answer, category, "src", "perception", "",
                                "dev", _b64_png((k * 20 % 250, 0, 0))]))
    path = root / "mmbench" / "mmbench_dev_20230712.tsv"
    path.parent.mkdir(parents=True)
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    write_jsonl(root / "mmbench_answers.jsonl", [{"question_id": r[0], "round_id": 0, "text": r[6]} for r in rows])
    return path


def test_mmbench_matching():
    opts = ["cat", "dog", "bird"]
    assert match_option("B", opts) == "B" and match_option("(C) bird", opts) == "C"
    assert match_option("A or B", opts) is None            # two letters, no option text
    assert match_option("a dog", opts) == "B"              # lower-case "a" is no letter; "dog" is option B
    assert match_option("D", opts) is None                 # no option D
    # VLMEvalKit @ aca64dbb can_infer, run on these answers: a refusal and a standalone "Z" are Z (wrong),
    # never an option read from the text; an API failure message is no letter, but text matching still runs
    assert match_option("Z. cat", opts) == "Z"
    assert match_option("Cannot determine the answer, maybe a cat", opts) == "Z"
    assert match_option("Failed to obtain answer via API: cat", opts) == "A"
    assert match_option("cat or dog", opts) is None        # two option texts


def test_mmbench_decodes_images_and_scores_circular(tmp_path):
    tsv = make_mmbench(tmp_path)
    task = get_task("mmbench")
    with pytest.raises(ValueError, match="pass image_root"):
        task.read(tsv)
    images = tmp_path / "mmb_images"
    questions = task.read(tsv, image_root=images)
    assert [q.question_id for q in questions] == [str(r[0]) for r in MMB]
    q1 = questions[4]
    assert q1.text == "Look at the sky.\nIs it day?\nA. yes\nB. no" + LETTER
    assert questions[6].choices == ["circle", "square", "triangle"]   # stops at the empty D
    assert q1.image == images / "1.png" and Image.open(q1.image).getpixel((0, 0)) == (80, 0, 0)
    result = task.score(questions, read_answers(tmp_path / "mmbench_answers.jsonl", questions))
    m = result.metrics
    # single pass: rows 0, 1, 2 all right -> 100; circular: groups 0 and 2 right, group 1 not -> 2/3
    assert result.headline == ("circular_accuracy", pytest.approx(200 / 3))
    assert m["accuracy"] == pytest.approx(100.0)
    assert m["recognition/circular_accuracy"] == pytest.approx(100.0)
    assert m["attribute/circular_accuracy"] == pytest.approx(0.0)
    assert (m["n_questions"], m["n_rows"], m["n_unmatched"]) == (3, 9, 1)


# ----------------------------------------------------------------------------------------
# Registry, answers file, detect, CLI
# ----------------------------------------------------------------------------------------

def test_registry_and_get_task():
    assert list(TASKS) == ["scienceqa_img", "pope", "mme", "gqa", "textvqa", "vqav2", "mmbench"]
    with pytest.raises(ValueError, match=r"unknown benchmark 'sqa'; supported: scienceqa_img, pope, mme"):
        get_task("sqa")


def test_answers_file_errors(tmp_path):
    base = make_gqa(tmp_path)
    task = get_task("gqa")
    questions = task.read(base)
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"question_id": "201", "text": "yes"}\n{"question_id": "202", "text": \n')
    with pytest.raises(ValueError, match=r"bad.jsonl:2: malformed JSON"):
        read_answers(bad, questions)
    write_jsonl(bad, [{"question_id": "999", "text": "yes"}])
    with pytest.raises(ValueError, match=r"bad.jsonl:1: answer for unknown question_id 999"):
        read_answers(bad, questions)
    write_jsonl(bad, [{"question_id": "201", "text": "yes"}, {"question_id": "201", "text": "no"}])
    with pytest.raises(ValueError, match=r"bad.jsonl:2: second answer for question 201 \(first on line 1\)"):
        read_answers(bad, questions)
    write_jsonl(bad, [{"question_id": "201"}])
    with pytest.raises(ValueError, match="bad.jsonl:1: missing text"):
        read_answers(bad, questions)
    with pytest.raises(FileNotFoundError, match="nope.jsonl"):
        read_answers(tmp_path / "nope.jsonl")
    partial = {"201": "yes", "202": "left"}
    with pytest.raises(ValueError, match=r"no answer for question 203 \(3 of 5 unanswered"):
        task.score(questions, partial)
    result = task.score(questions, partial, missing="skip")
    assert result.headline[1] == pytest.approx(100.0) and result.metrics["n_missing"] == 3
    with pytest.raises(ValueError, match="unknown question_id 7"):
        task.score(questions, {**partial, "7": "x"}, missing="skip")


def test_limit_and_missing_images(tmp_path):
    base = make_gqa(tmp_path)
    task = get_task("gqa")
    assert [q.question_id for q in task.read(base, limit=2)] == ["201", "202"]
    (base / "data" / "images" / "n203.jpg").unlink()
    with pytest.raises(FileNotFoundError, match=r"n203.jpg of question 203 does not exist"):
        task.read(base)
    assert len(task.read(base, check_images=False)) == 5
    other = tmp_path / "elsewhere"
    for k in GQA:
        png(other / f"n{k}.jpg")
    assert task.read(base, image_root=other)[2].image == other / "n203.jpg"


def test_detect(tmp_path):
    dirs = {"scienceqa_img": make_scienceqa(tmp_path), "pope": make_pope(tmp_path), "mme": make_mme(tmp_path),
            "gqa": make_gqa(tmp_path), "textvqa": make_textvqa(tmp_path), "vqav2": make_vqav2(tmp_path),
            "mmbench": make_mmbench(tmp_path).parent}
    for name, folder in dirs.items():
        assert detect(folder) == name
    assert detect(dirs["pope"] / "llava_pope_test.jsonl") == "pope"
    assert detect(dirs["mmbench"] / "mmbench_dev_20230712.tsv") == "mmbench"
    assert detect(tmp_path) is None                          # holds none of the markers itself
    (dirs["gqa"] / "llava_pope_test.jsonl").write_text("")
    assert detect(dirs["gqa"]) is None                       # two layouts: ambiguous


@pytest.mark.parametrize("name,make,extra,expected", [
    ("scienceqa_img", make_scienceqa, (), {"img_accuracy": 50.0, "n_failed": 2}),
    ("pope", make_pope, (), {"mean/f1": (50 + 200 / 3 + 100) / 3, "popular/f1": 200 / 3, "adversarial/tp": 1}),
    ("mme", make_mme, ("--benchmark", "mme"), {"perception": 225.0, "cognition": 200.0, "artwork/acc_plus": 50.0}),
    ("gqa", make_gqa, (), {"accuracy": 80.0, "open/accuracy": 200 / 3}),
    ("textvqa", make_textvqa, (), {"accuracy": 56.0}),
    ("vqav2", make_vqav2, (), {"accuracy": 85.0, "number/accuracy": 60.0}),
    ("mmbench", make_mmbench, (), {"circular_accuracy": 200 / 3, "accuracy": 100.0}),
])
def test_score_cli_reproduces_hand_metrics(tmp_path, capsys, name, make, extra, expected):
    data = make(tmp_path)
    out = tmp_path / "metrics.json"
    answers = tmp_path / f"{'sqa' if name == 'scienceqa_img' else name}_answers.jsonl"
    got = score_cli(data, answers, out, *extra)
    assert got["benchmark"] == name
    assert list(got["metrics"])[0] == got["headline"]["name"]
    for key, value in expected.items():
        assert got["metrics"][key] == pytest.approx(value), key
    printed = capsys.readouterr().out.splitlines()
    assert printed[0].startswith(f"{name}: {got['headline']['name']} = {got['headline']['value']:.2f}")
    assert not list(tmp_path.glob(".metrics.json.tmp*"))


def test_score_notes_when_official_positional_pairing_differs(tmp_path, capsys):
    """POPE's eval_pope.py zips a split's answers with its labels by position; MME's calculation.py
    takes a subtask's lines two by two: a reordered answers file gets one line saying so."""
    data = make_pope(tmp_path)   # its answers file is in reverse order
    assert main(["score", "--data", str(data), "--answers", str(tmp_path / "pope_answers.jsonl")]) == 0
    notes = [x for x in capsys.readouterr().out.splitlines() if x.startswith("note:")]
    assert len(notes) == 1 and "eval_pope.py pairs answers with labels by position" in notes[0]
    ordered = write_jsonl(tmp_path / "ordered.jsonl", [{"question_id": qid, "text": POPE_ANSWERS[qid]}
                                                       for qid, *_ in POPE])
    assert main(["score", "--data", str(data), "--answers", str(ordered)]) == 0
    assert "note:" not in capsys.readouterr().out
    mme = make_mme(tmp_path)
    lines = (tmp_path / "mme_answers.jsonl").read_text().splitlines()
    swapped = write_jsonl(tmp_path / "mme_swapped.jsonl", [json.loads(x) for x in [lines[1], lines[2], lines[0]]
                                                           + lines[3:]])
    assert main(["score", "--benchmark", "mme", "--data", str(mme), "--answers", str(swapped)]) == 0
    notes = [x for x in capsys.readouterr().out.splitlines() if x.startswith("note:")]
    assert len(notes) == 1 and "subtask 'existence'" in notes[0] and "calculation.py pairs lines" in notes[0]
    assert main(["score", "--benchmark", "mme", "--data", str(mme), "--answers",
                 str(tmp_path / "mme_answers.jsonl")]) == 0
    assert "note:" not in capsys.readouterr().out


def test_score_cli_errors_are_one_line(tmp_path, capsys):
    base = make_gqa(tmp_path)
    partial = write_jsonl(tmp_path / "partial.jsonl", [{"question_id": "201", "text": "yes"}])
    assert main(["score", "--data", str(base), "--answers", str(partial)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("Error: no answer for question 202")
    assert main(["score", "--data", str(base), "--answers", str(partial), "--allow-missing"]) == 0
    assert "n_missing" in capsys.readouterr().out
    assert main(["score", "--data", str(tmp_path), "--answers", str(partial)]) == 2
    assert "cannot tell the benchmark" in capsys.readouterr().err
    assert main(["score", "--data", str(tmp_path / "none"), "--answers", str(partial)]) == 2
    assert "does not exist" in capsys.readouterr().err
