"""Messages a newcomer reads (issue 20, section 8): the flag a message names exists, a
question is named as the user's files name it ("question <id>", plus sample_id where a run
knows it), and the console table prints configuration labels whole."""

from __future__ import annotations

import json

import polars as pl

from test_tasks import make_gqa, make_mme, make_vqav2, write_jsonl

from fastv_analysis.capture import BadSample
from fastv_analysis.cli.eval_cmd import headline
from fastv_analysis.cli.main import main
from fastv_analysis.data import Question, sample_name
from fastv_analysis.tasks import get_task


def test_score_with_missing_answers_names_the_cli_flag(tmp_path, capsys):
    base = make_gqa(tmp_path)
    partial = write_jsonl(tmp_path / "partial.jsonl", [{"question_id": "201", "text": "yes"}])
    assert main(["score", "--data", str(base), "--answers", str(partial)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--allow-missing" in err and "missing='skip'" not in err


def test_score_names_a_missing_mme_answer_by_the_files_id_and_prompt(tmp_path, capsys):
    base = make_mme(tmp_path)
    lines = (tmp_path / "mme_answers.jsonl").read_text().splitlines()
    partial = write_jsonl(tmp_path / "partial.jsonl", [json.loads(x) for x in lines[:-1]])  # java's answer gone
    assert main(["score", "--benchmark", "mme", "--data", str(base), "--answers", str(partial)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "#" not in err  # not the internal "<id>#<line>"
    assert "no answer for question code_reasoning/0020.png (prompt 'Is a java code shown in the picture?" in err


def test_a_sample_is_named_by_its_question_id_everywhere(tmp_path):
    q = Question(question_id="2", image=tmp_path / "gone.png", text="t", answer="a")
    assert str(BadSample(q, "q.jsonl", "image gone.png is missing")) == "q.jsonl: question 2: image gone.png is missing"
    assert sample_name("2", 1) == "question 2 (sample_id 1)"
    base = make_vqav2(tmp_path)
    ann = next(base.glob("*annotations*.json"))
    data = json.loads(ann.read_text())
    missing = data["annotations"].pop(2)["question_id"]
    ann.write_text(json.dumps(data))
    try:
        get_task("vqav2").read(base, check_images=False)
    except ValueError as err:
        assert f"question {missing} (entry 3 of 'questions') has no annotation" in str(err)
    else:
        raise AssertionError("a question without annotation was accepted")


def test_console_table_prints_configuration_labels_whole():
    rows = [dict(agg_layer=2, keep=64, config=c, n=480, accuracy=0.5, ci_lo=0.4, ci_hi=0.6, delta_vs_full=-0.1,
                 flops_ratio=0.3, mcnemar_p_vs_full_holm=0.01)
            for c in ("weighted_combination(alpha=0.25)", "avg_all_heads@text_mean", "x" * 50)]
    text = headline(pl.DataFrame(rows))
    assert "weighted_combination(alpha=0.25)" in text and "x" * 50 in text and "…" not in text
