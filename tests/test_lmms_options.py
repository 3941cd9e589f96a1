"""The lmms-eval plug-in's parts that need no lmms-eval (fastv_analysis.lmms_plugin): the core
package imports without it, and bad ``--model_args`` are refused in one line naming the key."""

import subprocess
import sys

import pytest

from fastv_analysis.lmms_plugin import answer_text, parse_options, question_id, sample_ids, truncate


def test_core_and_plugin_options_import_without_lmms_eval():
    code = ("import sys, fastv_analysis, fastv_analysis.lmms_plugin, fastv_analysis.pruning, fastv_analysis.capture; "
            "assert 'lmms_eval' not in sys.modules")
    assert subprocess.run([sys.executable, "-c", code], capture_output=True).returncode == 0


def test_options_build_the_fastv_config():
    opts = parse_options({"pretrained": "m", "agg_layer": "3", "keep": 32, "method": "max_head", "alpha": "0.3",
                          "stages": "8:16+12:8:max_head", "use_fast_v": "false", "batch_size": "4"})
    cfg = opts.fastv_config()
    assert (cfg.agg_layer, cfg.keep, cfg.method, cfg.alpha, cfg.use_fast_v) == (3, 32, "max_head", 0.3, False)
    assert [(s.agg_layer, s.keep, s.method) for s in cfg.stages] == [(8, 16, "avg_all_heads"), (12, 8, "max_head")]
    assert opts.batch_size == 4
    assert parse_options({"pretrained": "m", "query": "text_mean"}).fastv_config().params == {"query": "text_mean"}


@pytest.mark.parametrize("args, message", [
    ({"keep": 3}, r"pretrained=PATH is required"),
    ({"pretrained": "m", "kep": 3}, r"unknown key\(s\) kep for --model fastv; expected pretrained, agg_layer"),
    ({"pretrained": "m", "keep": "many"}, r"--model_args keep='many': expected int"),
    ({"pretrained": "m", "use_fast_v": "maybe"}, r"--model_args use_fast_v='maybe': expected bool"),
])
def test_bad_model_args_one_line(args, message):
    with pytest.raises(ValueError, match=message):
        parse_options(args)


def test_positions_option_defaults_to_the_methods_policy():
    """``positions=original|compact``; left out, the method's registered policy (as eval), and in
    mask mode (which keeps the sequence whole) original."""
    def policy(**args):
        return parse_options({"pretrained": "m", **args}).fastv_config().positions

    assert policy() == "original" and policy(method="divprune") == "compact"
    assert policy(method="divprune", positions="original") == "original"
    assert policy(method="avg_all_heads", positions="compact") == "compact"
    assert policy(method="visionzip", agg_layer=0) == "compact" and policy(method="divprune", mode="mask") == "original"


@pytest.mark.parametrize("args, message", [
    ({"positions": "gapped"}, r"--model_args: positions must be one of original, compact, got 'gapped'"),
    ({"positions": "compact", "mode": "mask"}, r"--model_args: positions='compact' re-numbers"),
    ({"method": "nope"}, r"--model_args: unknown method 'nope'"),
    ({"stages": "8"}, r"--model_args stages=8: expected K:KEEP\[:METHOD\] joined by '\+', got '8'"),
    ({"alpha": 2}, r"--model_args: alpha must be in \[0, 1\]"),
])
def test_bad_pruning_args_one_line(args, message):
    with pytest.raises(ValueError, match=message):
        parse_options({"pretrained": "m", **args}).fastv_config()


def test_ids_answers_and_stops():
    assert sample_ids([("b", 0), ("a", 2), ("a", 1), ("b", 0)]) == {("a", 1): 0, ("a", 2): 1, ("b", 0): 2}
    assert answer_text({"answer": 2}, "answer") == "C" and answer_text({"answer": "yes"}, "answer") == "yes"
    assert answer_text({}, "answer") == ""
    assert question_id({"question_id": 7}, "question_id", "pope", 3) == "7"
    assert question_id({}, "question_id", "pope", 3) == "pope/3"
    assert truncate("yes\n\nUSER: more", ["\n\n", "USER:"]) == "yes"
