"""--skip-bad skips a benchmark sample whose image is missing like one whose PNG is truncated
(issue 20, section 3), and a rerun after the file is restored captures just those samples."""

import json

import pytest

from fastv_analysis.cli.main import main
from fastv_analysis.store import open_run
from test_tasks import make_pope, png


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    from fastv_analysis.toy.checkpoint import save_tiny_random_checkpoint

    return save_tiny_random_checkpoint(tmp_path_factory.mktemp("mi") / "m", seed=4, text={"num_hidden_layers": 3})


def _capture(model, data, run, *extra):
    return main(["capture", "--model", str(model), "--data", str(data), "--out", str(run), "--max-new-tokens", "1",
                 "--quiet", *extra])


def test_missing_and_truncated_images_are_skipped_alike_and_recaptured(tiny_model, tmp_path, capsys):
    data = make_pope(tmp_path)
    missing, truncated = data / "val2014" / "COCO_val2014_a1.jpg", data / "val2014" / "COCO_val2014_p1.jpg"
    missing.unlink()
    truncated.write_bytes(truncated.read_bytes()[:60])
    run = tmp_path / "run"
    assert _capture(tiny_model, data, run) != 0  # without --skip-bad: one line naming the image
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and str(missing) in err
    assert _capture(tiny_model, data, run, "--skip-bad") == 0, capsys.readouterr().err
    assert "2 bad" in capsys.readouterr().out
    errors = [json.loads(line) for line in (run / "errors.jsonl").read_text().splitlines()]
    assert [(e["question_id"], e["error"].split(" ")[-2:]) for e in errors] == \
        [("1", ["is", "missing"]), ("2", ["unreadable", "(OSError)"])]
    assert 0 not in open_run(run).sample_ids and 1 not in open_run(run).sample_ids
    assert main(["select", str(run), "--keep", "8", "--methods", "random", "--quiet"]) == 0
    assert main(["eval", str(run), "--timing-samples", "0", "--quiet"]) == 0, capsys.readouterr().err

    png(missing)
    png(truncated)
    capsys.readouterr()
    assert _capture(tiny_model, data, run, "--skip-bad") == 0
    out = capsys.readouterr().out
    n = open_run(run).samples.height
    assert f"2 new samples ({n - 2} already done, 0 bad)" in out and not (run / "errors.jsonl").exists()
