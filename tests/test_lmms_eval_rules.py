"""``--rules lmms-eval`` (fastv_analysis.tasks.lmms_eval_rules): on small fixtures in each
benchmark's exact on-disk layout, with answers chosen where lmms-eval and the official
scripts disagree, every number equals what lmms-eval's own task functions printed on the
same answers.

Expected numbers: EvolvingLMMs-Lab/lmms-eval at 75571cfe0fa36ca5ec2e6aa2bb268f9d38295af3
(v0.7.2-41; the task utils used are unchanged since v0.7.2 = cb45ac4d4a667ea5ef89c7a148bff69b3489b981),
run in a separate venv on these tables: each answer through ``api.reasoning.strip_reasoning_tags``
with the CLI's default tags and ``.strip()`` (``ConfigurableTask.process_results``), then
``tasks/scienceqa/utils.sqa_process_results`` + mean; ``tasks/pope/utils.pope_process_results``
+ ``pope_aggregate_*``; ``tasks/mme/utils.mme_process_results`` + ``mme_aggregate_results``;
``api/metrics.exact_match_hf_evaluate(ignore_case=True, ignore_punctuation=True)`` + mean (gqa.yaml);
``tasks/textvqa/utils.textvqa_process_results``; ``tasks/vqav2/utils.vqav2_process_results_val``
(answers as ``{"answer", "answer_confidence", "answer_id"}`` dicts like the HF set);
``tasks/mmbench/en_utils.mmbench_process_results`` + ``MMBench_Evaluator.eval_result(eval_method="static")``
(``mmbench_en_dev_static``). lmms-eval prints fractions; the literals below are x 100.
"""

from __future__ import annotations

import base64
import io
import json
from pathlib import Path

import pytest
from PIL import Image

from fastv_analysis.cli.main import main
from fastv_analysis.tasks import get_task, read_answers
from fastv_analysis.tasks.lmms_eval_rules import (RULES, extract_letter, infer_option, leave_one_out, parse_mme,
                                                  prediction, with_rules)

from test_tasks import write_json, write_jsonl  # noqa: E402  (the same fixture writers)

SHORT = "\nAnswer the question using a single word or phrase."


# ----------------------------------------------------------------------------------------
# Fixtures: (data folder or file, answers file) in LLaVA's layout; images are not needed
# ----------------------------------------------------------------------------------------

SQA = {  # id: (choices, answer index, has image, subject, model text)
    "1": (["cat", "dog", "bird"], 1, True, "natural science", "B"),
    "2": (["red", "blue"], 0, True, "natural science", "a"),                  # lower case
    "3": (["x", "y", "z", "w"], 2, True, "social science", "C."),
    "4": (["p", "q"], 1, True, "language science", "B. q"),
    "5": (["yes", "no"], 0, False, "language science", "A"),                  # text-only: not IMG
    "6": (["a1", "a2", "a3"], 0, True, "social science", "The answer is A."),
    "7": (["m", "n"], 1, True, "natural science", " B\n"),
    "8": (["s", "t", "u"], 2, True, "natural science", "<think>It is A or C.</think>C"),
    "9": (["k", "l"], 0, True, "social science", "D"),
    "10": (["e", "f", "g"], 1, True, "language science", "b. f"),
    "11": (["h", "i"], 1, True, "natural science", "A"),
    "12": (["o", "p", "q", "r"], 3, True, "social science", "D. r, because"),
}


def make_scienceqa(root: Path) -> tuple[Path, Path]:
    base = root / "scienceqa"
    problems, entries = {}, []
    for pid, (choices, answer, has_image, subject, _) in SQA.items():
        problems[pid] = {"question": f"q{pid}?", "choices": choices, "answer": answer, "subject": subject,
                         "image": "image.png" if has_image else None, "hint": "", "split": "test"}
        options = "\n".join(f"{'ABCDE'[i]}. {c}" for i, c in enumerate(choices))
        entry = {"id": pid, "conversations": [{"from": "human", "value": f"<image>\nContext: N/A\nq{pid}?\n{options}"},
                                              {"from": "gpt", "value": "A"}]}
        if has_image:
            entry["image"] = f"{pid}/image.png"
        else:
            entry["conversations"][0]["value"] = entry["conversations"][0]["value"].replace("<image>\n", "")
        entries.append(entry)
    write_json(base / "problems.json", problems)
    write_json(base / "pid_splits.json", {"test": list(SQA)})
    write_json(base / "llava_test_CQM-A.json", entries)
    answers = write_jsonl(root / "sqa_answers.jsonl", [{"question_id": k, "prompt": "<image>\np", "text": v[4]}
                                                       for k, v in SQA.items()])
    return base, answers


POPE = [  # (question_id, split, object, label, model text)
    (1, "adversarial", "dog", "yes", "Yes"), (2, "adversarial", "cat", "no", "No"),
    (3, "adversarial", "bus", "yes", "Yes."), (4, "adversarial", "cow", "no", "no."),
    (5, "popular", "cup", "yes", " YES "), (6, "popular", "pen", "no", "yes"),
    (7, "popular", "hat", "yes", "no"), (8, "popular", "car", "no", "No, there is not."),
    (9, "random", "man", "yes", "There is a man"), (10, "random", "box", "yes", "There is no box"),
    (11, "random", "bed", "no", "No"), (12, "random", "tie", "no", "yes"),
    (13, "random", "cake", "yes", "<think>no?</think>Yes"),
]


def make_pope(root: Path) -> tuple[Path, Path]:
    base = root / "pope"
    write_jsonl(base / "llava_pope_test.jsonl",
                [{"question_id": q, "image": f"COCO_val2014_{q:012d}.jpg",
                  "text": f"Is there a {o} in the image?{SHORT}", "category": s} for q, s, o, _, _ in POPE])
    for split in ("adversarial", "popular", "random"):
        write_jsonl(base / "coco" / f"coco_pope_{split}.json",
                    [{"question_id": q, "image": f"COCO_val2014_{q:012d}.jpg", "text": f"Is there a {o} in the image?",
                      "label": lab} for q, s, o, lab, _ in POPE if s == split])
    answers = write_jsonl(root / "pope_answers.jsonl", [{"question_id": q, "prompt": "p", "text": t}
                                                        for q, *_, t in POPE])
    return base, answers


MME = {  # (subtask, image): [(question, answer, model text)] x 2
    ("existence", "000000000001.jpg"): [("Is there a dog in this image?", "Yes", "Yes"),
                                        ("Is there a cat in this image?", "No", "No")],
    ("existence", "000000000002.jpg"): [("Is there a car in this image?", "Yes", "y"),
                                        ("Is there a bus in this image?", "No", "n")],
    ("existence", "000000000003.jpg"): [("Is there a person in this image?", "Yes", "Yes, there is."),
                                        ("Is there a horse in this image?", "No", "There is a horse")],
    ("artwork", "10002.jpg"): [("Is this artwork created by Monet?", "Yes", "Yes."),
                               ("Is this artwork created by Dali?", "No", "No.")],
    ("artwork", "10003.jpg"): [("Is this artwork titled Sunrise?", "Yes", "No"),
                               ("Is this artwork titled Night?", "No", "N.")],
    ("code_reasoning", "0020.png"): [("Is a python code shown in the picture?", "Yes", "Yes"),
                                     ("Is a java code shown in the picture?", "No", "NO.")],
    ("numerical_calculation", "0001.png"): [("Is the answer 3?", "Yes", "<think>no</think>yes"),
                                            ("Is the answer 4?", "No", "no")],
}


def make_mme(root: Path) -> tuple[Path, Path]:
    base = root / "MME"
    rel = base / "MME_Benchmark_release_version"
    rows, texts = [], []
    for (task, image), pairs in MME.items():
        nested = task == "artwork"  # artwork: images/ + questions_answers_YN/; the others flat
        (rel / task / ("images" if nested else "")).mkdir(parents=True, exist_ok=True)
        txt = rel / task / ("questions_answers_YN" if nested else "") / (image.split(".")[0] + ".txt")
        txt.parent.mkdir(parents=True, exist_ok=True)
        txt.write_text("".join(f"{q} Please answer yes or no.\t{a}\n" for q, a, _ in pairs))
        for question, _, text in pairs:
            rows.append({"question_id": f"{task}/{image}", "image": f"{task}/{image}", "text": question + SHORT,
                         "category": task})
            texts.append(text)
    write_jsonl(base / "llava_mme.jsonl", rows)
    answers = write_jsonl(root / "mme_answers.jsonl", [{"question_id": r["question_id"], "prompt": r["text"], "text": t}
                                                       for r, t in zip(rows, texts)])
    return base, answers


GQA = {  # id: (answer, model text)
    "201": ("yes", "Yes."), "202": ("left", "Left"), "203": ("white", "The white one"), "204": ("no", "no.."),
    "205": ("t-shirt", "T-shirt"), "206": ("t-shirt", "tshirt"), "207": ("yes", " yes"), "208": ("no", "No!"),
    "209": ("red", "<think>red or blue</think>Red"), "210": ("table", "the table"),
    "211": ("coffee table", "coffee-table"),
}


def make_gqa(root: Path) -> tuple[Path, Path]:
    base = root / "gqa"
    write_jsonl(base / "llava_gqa_testdev_balanced.jsonl",
                [{"question_id": k, "image": f"n{k}.jpg", "text": f"Question {k}?{SHORT}"} for k in GQA])
    write_json(base / "data" / "testdev_balanced_questions.json",
               {k: {"imageId": f"n{k}", "question": f"Question {k}?", "answer": a,
                    "types": {"structural": "query", "semantic": "attr"}} for k, (a, _) in GQA.items()})
    return base, write_jsonl(root / "gqa_answers.jsonl", [{"question_id": k, "text": v[1]} for k, v in GQA.items()])


TEXTVQA = [  # (question_id, image, question, human answers, model text)
    (34602, "img1", "What is the brand of this camera?", ["dakota"] * 2 + ["Dakota."] + ["dakota digital"] * 7,
     "Dakota"),
    (34603, "img1", "How many bottles are there?", ["2", "two"] + ["3"] * 8, "Two."),
    (34604, "img2", "Whose bag is this?", ["cat's"] * 4 + ["the cats"] * 6, "the cat's"),
    (34605, "img3", "What does the sign say?", ["stop"] + ["STOP sign"] * 9, "<think>stop?</think> STOP sign"),
    (34606, "img3", "What is written?", ["hello world"] * 10, "goodbye"),
    (34607, "img4", "What colors?", ["black,white"] * 4 + ["gray"] * 6, "black white"),
]


def make_textvqa(root: Path) -> tuple[Path, Path]:
    base = root / "textvqa"
    rows = [{"question_id": img, "image": f"{img}.jpg", "text": f"{q}\nReference OCR token: a, b{SHORT}"}
            for _, img, q, _, _ in TEXTVQA]
    write_json(base / "TextVQA_0.5.1_val.json",
               {"data": [{"question_id": qid, "image_id": img, "question": q.lower(), "answers": h}
                         for qid, img, q, h, _ in TEXTVQA]})
    write_jsonl(base / "llava_textvqa_val_v051_ocr.jsonl", rows)
    answers = write_jsonl(root / "textvqa_answers.jsonl", [{"question_id": r["question_id"], "prompt": r["text"],
                                                            "text": t[4]} for r, t in zip(rows, TEXTVQA)])
    return base, answers


VQAV2 = [  # (question_id, image_id, answer_type, human answers, model text)
    (1001, 42, "other", ["white"] * 5 + ["gray"] * 5, "White."),
    (1002, 42, "number", ["2"] * 2 + ["3"] * 8, "two"),
    (1003, 43, "other", ["t-shirt"] * 10, "t-shirt"),
    (1004, 43, "other", ["mcdonald's"] * 4 + ["burger king"] * 6, "McDonald's"),
    (1005, 44, "other", ["black,white"] * 4 + ["gray"] * 6, "black white"),
    (1006, 44, "yes/no", ["yes"] * 3 + ["no"] * 7, "<think>hmm</think>Yes"),
    (1007, 44, "other", ["umbrella", "an umbrella", "an umbrella"] + ["bag"] * 7, "the umbrella"),
]


def make_vqav2(root: Path) -> tuple[Path, Path]:
    base = root / "vqav2"
    write_json(base / "v2_OpenEnded_mscoco_val2014_questions.json",
               {"questions": [{"question_id": q, "image_id": i, "question": f"Q{q}?"} for q, i, *_ in VQAV2]})
    write_json(base / "v2_mscoco_val2014_annotations.json",
               {"annotations": [{"question_id": q, "image_id": i, "answer_type": t, "question_type": "what",
                                 "multiple_choice_answer": h[0],
                                 "answers": [{"answer": a, "answer_confidence": "yes", "answer_id": k + 1}
                                             for k, a in enumerate(h)]} for q, i, t, h, _ in VQAV2]})
    return base, write_jsonl(root / "vqav2_answers.jsonl", [{"question_id": q, "text": p} for q, *_, p in VQAV2])


MMB = [  # (index, options, answer, category, model text)
    (0, ["cat", "dog", "bird", "fish"], "B", "recognition", "B"),
    (1000000, ["dog", "bird", "fish", "cat"], "A", "recognition", "A. dog"),
    (2000000, ["bird", "fish", "cat", "dog"], "D", "recognition", "The answer is D"),
    (3000000, ["fish", "cat", "dog", "bird"], "C", "recognition", "dog"),
    (1, ["yes", "no"], "A", "attribute", "A"),
    (1000001, ["no", "yes"], "B", "attribute", "A or B"),
    (2, ["circle", "square", "triangle"], "C", "recognition", "C"),
    (1000002, ["square", "triangle", "circle"], "B", "recognition", "triangle"),
    (2000002, ["triangle", "circle", "square"], "A", "recognition", "(A)"),
    (3, ["cat", "dog", "fish"], "A", "recognition", "Cannot determine the answer, maybe a cat"),
    (4, ["apple", "pear", "plum"], "A", "attribute", "Z. apple"),
    (5, ["red", "green", "blue", "pink"], "B", "attribute", "The correct answer is (B)."),
    (6, ["dog", "cat", "mat"], "B", "recognition", "A cat sits on the mat"),
    (7, ["one", "two", "three", "four"], "D", "counting", "E"),
    (8, ["summer", "winter"], "B", "attribute", "b"),
    (9, ["hammer", "saw", "drill"], "C", "recognition", "<think>A or B</think>C"),
    (10, ["one", "two", "three"], "C", "counting", "Answer:C"),
    (11, ["red", "blue"], "A", "counting", "I think B is wrong, so A"),
]


def _b64_png() -> str:
    buf = io.BytesIO()
    Image.new("RGB", (2, 2), (9, 9, 9)).save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


def make_mmbench(root: Path) -> tuple[Path, Path]:
    header = ["index", "question", "hint", "A", "B", "C", "D", "answer", "category", "source", "l2-category",
              "comment", "split", "image"]
    lines = ["\t".join(header)]
    for index, options, answer, category, _ in MMB:
        lines.append("\t".join([str(index), f"Question {index % 1000000}?", "", *(options + [""] * (4 - len(options))),
                                answer, category, "src", "perception", "", "dev", _b64_png()]))
    path = root / "mmbench" / "mmbench_dev_20230712.tsv"
    path.parent.mkdir(parents=True)
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path, write_jsonl(root / "mmbench_answers.jsonl", [{"question_id": r[0], "text": r[4]} for r in MMB])


MAKERS = {"scienceqa_img": make_scienceqa, "pope": make_pope, "mme": make_mme, "gqa": make_gqa,
          "textvqa": make_textvqa, "vqav2": make_vqav2, "mmbench": make_mmbench}


def scored(tmp_path: Path, name: str, rules: str):
    data, answers = MAKERS[name](tmp_path)
    task = with_rules(get_task(name), rules)
    questions = task.read(data, check_images=False)
    return task.score(questions, read_answers(answers, questions))


# ----------------------------------------------------------------------------------------
# Each benchmark: our score with lmms-eval rules == lmms-eval's functions on the same answers
# ----------------------------------------------------------------------------------------

# Printed by lmms-eval's functions (75571cfe, see the module docstring), x 100.
LMMS_EVAL = {
    # sqa_process_results + mean: 0.6363636363636364
    "scienceqa_img": ("img_accuracy", {"img_accuracy": 63.63636363636364},
                      [1, 1, 1, 1, 0, 1, 1, 0, 0, 0, 1]),
    # pope_aggregate_* on all 13 (the `pope` task) and per split (pope_adv / pope_pop / pope_random)
    "pope": ("f1", {"f1": 66.66666666666665, "accuracy": 38.46153846153846, "precision": 60.0, "recall": 75.0,
                    "yes_ratio": 53.84615384615384,
                    "adversarial/accuracy": 50.0, "adversarial/precision": 100.0, "adversarial/recall": 100.0,
                    "adversarial/f1": 100.0, "adversarial/yes_ratio": 50.0,
                    "popular/accuracy": 25.0, "popular/precision": 50.0, "popular/recall": 50.0,
                    "popular/f1": 50.0, "popular/yes_ratio": 50.0,
                    "random/accuracy": 40.0, "random/precision": 50.0, "random/recall": 100.0,
                    "random/f1": 66.66666666666666, "random/yes_ratio": 60.0},
             [1, 1, 0, 0, 1, 0, 0, 0, 0, 0, 1, 0, 1]),
    # mme_aggregate_results: existence 150.00, artwork 125.00, code_reasoning 200.00,
    # numerical_calculation 200.00; perception 275.0, cognition 400.0 (points, as printed)
    "mme": ("perception", {"perception": 275.0, "cognition": 400.0, "existence/score": 150.0,
                           "artwork/score": 125.0, "code_reasoning/score": 200.0,
                           "numerical_calculation/score": 200.0},
            [1, 1, 1, 1, 1, 0, 1, 1, 0, 1, 1, 1, 1, 1]),
    # exact_match_hf_evaluate(ignore_case, ignore_punctuation) + mean: 0.7272727272727273
    "gqa": ("accuracy", {"accuracy": 72.72727272727273}, [1, 1, 0, 1, 1, 1, 1, 1, 1, 0, 0]),
    # textvqa_process_results: 0.9, 0.6, 1, 1, 0.0, 0.0 -> mean 0.5833333333333334
    "textvqa": ("accuracy", {"accuracy": 58.33333333333334}, [0.9, 0.6, 1, 1, 0, 0]),
    # vqav2_process_results_val: 1, 0.6, 1, 1, 1, 0.9, 0.9 -> mean 0.9142857142857143
    "vqav2": ("accuracy", {"accuracy": 91.42857142857143}, [1, 0.6, 1, 1, 1, 0.9, 0.9]),
    # MMBench_Evaluator.eval_result(eval_method="static"): overall 0.6666666666666666; category
    # attribute 0.5, counting 0.6666666666666666, recognition 0.8; l2 perception 0.6666666666666666
    "mmbench": ("circular_accuracy", {"circular_accuracy": 66.66666666666666, "attribute/circular_accuracy": 50.0,
                                      "counting/circular_accuracy": 66.66666666666666,
                                      "recognition/circular_accuracy": 80.0,
                                      "l2:perception/circular_accuracy": 66.66666666666666},
                [1, 1, 1, 1, 1, 0, 1, 1, 1, 1, 1, 1, 0, 0, 0, 1, 1, 1]),
}


@pytest.mark.parametrize("name", list(LMMS_EVAL))
def test_lmms_eval_rules_equal_lmms_eval(tmp_path, name):
    headline, expected, per_question = LMMS_EVAL[name]
    result = scored(tmp_path, name, "lmms-eval")
    assert result.headline == (headline, pytest.approx(expected[headline]))
    for key, value in expected.items():
        assert result.metrics[key] == pytest.approx(value), key
    assert result.per_question["score"].to_list() == pytest.approx(per_question)


@pytest.mark.parametrize("name", list(LMMS_EVAL))
def test_default_rules_unchanged(tmp_path, name):
    """--rules official is the task's own scorer (the fixtures score differently under the two)."""
    data, answers = MAKERS[name](tmp_path)
    task = get_task(name)
    assert with_rules(task, "official") is task
    questions = task.read(data, check_images=False)
    official = task.score(questions, read_answers(answers, questions))
    assert official.headline[1] != pytest.approx(LMMS_EVAL[name][1][LMMS_EVAL[name][0]])


def test_mmbench_letters_per_row(tmp_path):
    # can_infer (can_infer_option, then can_infer_text), else extract_mcq_answer with the row's
    # letters, as lmms-eval ran them on each row of MMB (75571cfe)
    result = scored(tmp_path, "mmbench", "lmms-eval")
    assert result.per_question["parsed"].to_list() == ["B", "A", "D", "C", "A", "A", "C", "B", "A", "A", "A", "B",
                                                       "A", "E", "", "C", "C", "A"]
    assert result.metrics["n_questions"] == 12 and result.metrics["n_unmatched"] == 1
    # rows can_infer misses (mmbench_en_dev would ask GPT): "A or B", "A cat sits on the mat", "b",
    # "Answer:C", "I think B is wrong, so A" (the harness's can_infer returned False for exactly these)
    assert result.metrics["n_judge_rows"] == 5


def test_mme_parsing_and_pairs(tmp_path):
    # lmms-eval's parse_pred_ans (75571cfe) on the same texts
    facts = {"y": "yes", "N.": "no", "Yes.": "yes", "no.": "no", "Nope": "no", "ye": "other", "x": "other",
             "YES, it is": "yes"}
    assert {t: parse_mme(t) for t in facts} == facts
    data, answers = make_mme(tmp_path)
    task = with_rules(get_task("mme"), "lmms-eval")
    questions = task.read(data, check_images=False)
    partial = {k: v for k, v in read_answers(answers, questions).items() if not k.startswith("artwork/10003.jpg#2")}
    with pytest.raises(ValueError, match=r"mme: image artwork/10003.jpg has 1 answered question\(s\); lmms-eval "
                                         r"scores MME in pairs"):
        task.score(questions, partial, missing="skip")


def test_prediction_and_matchers():
    # strip_reasoning_tags with the CLI's default tags, then .strip() (75571cfe)
    facts = {"<think>a</think> B ": "B", "reasoning</think>B": "B", "<think>unclosed B": "<think>unclosed B",
             "<analysis>x</analysis><think>y</think>C": "C", "a</think>b<think>c": "a</think>b<think>c",
             "<think>1</think>x<think>2</think>y": "xy", " plain\n": "plain"}
    assert {t: prediction(t) for t in facts} == facts
    # MMBench_Evaluator.can_infer_option (False -> None here)
    facts = {"B": "B", "A cat sits on the mat": None, "E": "E", "(C) bird": "C", "Answer: (B).": "B",
             "I think :C": "C", "A B": None, "Failed to obtain answer via API: A": None}
    assert {t: infer_option(t) for t in facts} == facts
    # extract_mcq_answer(text, choices=["A", "B", "C"])
    facts = {"Answer:C": "C", "A or B": "A", "I think B is wrong, so A": "A", "the answer is Big": "B", "b": "",
             "xyz": "", "The option C. is right but (B)": "B", "答案是B": "B"}
    assert {t: extract_letter(t, ["A", "B", "C"]) for t in facts} == facts
    assert leave_one_out("a", ["a"] * 3 + ["b"] * 7) == pytest.approx(0.9)
    assert leave_one_out("a", ["a", "b"]) == pytest.approx(1 / 6)  # (min(1, 0/3) + min(1, 1/3)) / 2


def test_with_rules_errors():
    assert RULES == ("official", "lmms-eval")
    with pytest.raises(ValueError, match="unknown rules 'lmms'; supported: official, lmms-eval"):
        with_rules(get_task("gqa"), "lmms")
    task = with_rules(get_task("pope"), "lmms-eval")
    assert task.headline == "f1" and task.title.endswith("lmms-eval rules") and task.name == "pope"


# ----------------------------------------------------------------------------------------
# CLI: fastv-analyze score --rules lmms-eval
# ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", list(LMMS_EVAL))
def test_score_cli_rules_flag(tmp_path, capsys, name):
    data, answers = MAKERS[name](tmp_path)
    out = tmp_path / "m.json"
    args = ["score", "--data", str(data), "--answers", str(answers), "--out", str(out)]
    assert main([*args, "--rules", "lmms-eval"]) == 0
    got = json.loads(out.read_text())
    headline, expected, _ = LMMS_EVAL[name]
    assert (got["benchmark"], got["rules"], got["headline"]["name"]) == (name, "lmms-eval", headline)
    assert got["headline"]["value"] == pytest.approx(expected[headline])
    first = capsys.readouterr().out.splitlines()[0]
    assert first.startswith(f"{name}: {headline} = {expected[headline]:.2f}") and "lmms-eval rules" in first
    assert main(args) == 0                                   # default: the official rules
    default = json.loads(out.read_text())
    task = get_task(name)
    questions = task.read(data, check_images=False)
    assert default["rules"] == "official"
    official = task.score(questions, read_answers(answers, questions))
    assert default["headline"]["value"] == pytest.approx(official.headline[1])


def test_score_cli_bad_rules_is_one_line(tmp_path, capsys):
    data, answers = make_gqa(tmp_path)
    assert main(["score", "--data", str(data), "--answers", str(answers), "--rules", "lmms"]) != 0
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "'lmms' is not one of 'official', 'lmms-eval'" in err[0]
