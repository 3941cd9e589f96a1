"""Resumable answers: each process's finished samples in checksummed parts under
``RUN/.eval-parts/<key>/``, the key naming everything the answers depend on (kept sets, model,
data, answer length, numerics).
"""

from __future__ import annotations

import hashlib
import io
import json
import re
import sys
from pathlib import Path

import polars as pl

from ..store import atomic_write_bytes, atomic_write_json

PART_SAMPLES = 16

ANSWER_SCHEMA = {"sample_id": pl.Int64, "agg_layer": pl.Int64, "selection_id": pl.Utf8, "prediction": pl.Utf8,
                 "correct": pl.Boolean}

TIMING_SCHEMA = {"sample_id": pl.Int64, "agg_layer": pl.Int64, "keep": pl.Int64, "n_sets": pl.Int64,
                 "prefill_seconds": pl.Float64, "decode_seconds": pl.Float64, "decode_tokens": pl.Int64}


def _settings_key(model_id: str, data_sha256: str, max_new_tokens: int, selections: pl.DataFrame,
                  numerics: str = "") -> str:
    """What the cached answers depend on: the kept sets asked for, model, data, answer
    length, and the numerics they were computed in (dtype, device type, attention kernel:
    a bfloat16 eval must not reuse float32 answers)."""
    asked = selections.select("sample_id", "agg_layer", "keep", "selection_id").unique().sort(pl.all())
    h = hashlib.sha256(f"{model_id}|{data_sha256}|{max_new_tokens}|{numerics}|".encode() + asked.write_csv().encode())
    return h.hexdigest()[:16]


def numerics_key(loaded, adapter) -> str:
    """The numerics answers were computed in, as :func:`_settings_key` names them: dtype,
    device type and the configured attention kernel (``torch.float32|cpu|sdpa``)."""
    return f"{loaded.dtype}|{loaded.device.type}|{adapter.attention_kernel}"


class EvalParts:
    """Answers of finished samples, in parts under RUN/.eval-parts/<key>/, so an
    interrupted eval resumes where it stopped (key: selections, model, answer length).
    Each process of a sharded eval writes its own ``answers-R-N`` / ``timing-R-N`` parts, and
    last ``part-R-N.json`` with both files' sha256: a part counts once that lands and its
    files match it. A damaged part is removed (its samples are answered again, said in one
    line on stderr); a sample found in two parts (an older version's concurrent evals)
    counts once."""

    _NUMBER = re.compile(r"^(?:answers|timing|part)-(\d+)-(\d+)\.(?:parquet|json)$")

    def __init__(self, root: Path, key: str, rank: int = 0):
        self.dir = root / ".eval-parts" / key
        self.rank = rank
        self.dir.mkdir(parents=True, exist_ok=True)
        self._answers: list[dict] = []
        self._timing: list[dict] = []

    def add(self, answers: list[dict], timing: list[dict]) -> None:
        """Keep one sample's answer and timing rows; write them as a part once they hold
        :data:`PART_SAMPLES` samples (:meth:`flush` writes the rest)."""
        self._answers.extend(answers)
        self._timing.extend(timing)
        if len({r["sample_id"] for r in self._timing}) >= PART_SAMPLES:
            self.flush()

    def flush(self) -> None:
        """Write the rows kept so far as one part (nothing when there are none)."""
        self.write(self._answers, self._timing)
        self._answers, self._timing = [], []

    def _read(self, name: str) -> tuple[pl.DataFrame, pl.DataFrame] | str:
        """A part's (answers, timing), or what is wrong with it."""
        files = {kind: self.dir / f"{kind}-{name}.parquet" for kind in ("answers", "timing")}
        manifest = self.dir / f"part-{name}.json"
        try:
            sums = json.loads(manifest.read_text()) if manifest.exists() else {}  # none: an older version's part
        except ValueError:
            return f"{manifest} is damaged"
        for kind, path in files.items():
            if not path.is_file():
                return f"{path} is missing"
            if kind in sums and hashlib.sha256(path.read_bytes()).hexdigest() != sums[kind]:
                return f"{path} is damaged (its sha256 differs from {manifest.name})"
        try:
            return pl.read_parquet(files["answers"]), pl.read_parquet(files["timing"])
        except Exception as err:  # polars raises several kinds on an unreadable file
            return f"{files['answers']} or its timing is unreadable ({err.__class__.__name__})"

    def load(self) -> tuple[pl.DataFrame, pl.DataFrame]:
        """Answers and timings of complete, intact parts, each sample from the first part holding it."""
        names = sorted({f.stem.split("-", 1)[1] for f in self.dir.glob("part-*.json")}
                       | {f.stem.split("-", 1)[1] for f in self.dir.glob("timing-*.parquet")})
        answers, timing, seen = [], [], set()
        for name in names:
            part = self._read(name)
            if isinstance(part, str):
                print(f"eval: {part}: its samples are answered again", file=sys.stderr)
                for kind in ("part-{}.json", "timing-{}.parquet", "answers-{}.parquet"):
                    (self.dir / kind.format(name)).unlink(missing_ok=True)
                continue
            new = pl.col("sample_id").is_in(list(seen)).not_()
            answers.append(part[0].filter(new))
            timing.append(part[1].filter(new))
            seen |= set(part[1]["sample_id"].to_list())
        return (pl.concat(answers) if answers else pl.DataFrame(schema=ANSWER_SCHEMA),
                pl.concat(timing) if timing else pl.DataFrame(schema=TIMING_SCHEMA))

    def write(self, answers: list[dict], timing: list[dict]) -> None:
        """Answers, timing, then their sha256 in part-R-N.json: a part counts only once all three are there."""
        if not timing:
            return
        found = (self._NUMBER.match(f.name) for f in self.dir.iterdir())
        numbers = [int(m[2]) for m in found if m and int(m[1]) == self.rank]
        n = f"{self.rank:03d}-{max(numbers, default=-1) + 1:05d}"
        sums = {}
        for kind, rows, schema in (("answers", answers, ANSWER_SCHEMA), ("timing", timing, TIMING_SCHEMA)):
            buffer = io.BytesIO()
            pl.DataFrame(rows, schema=schema).write_parquet(buffer)
            sums[kind] = hashlib.sha256(buffer.getvalue()).hexdigest()
            atomic_write_bytes(self.dir / f"{kind}-{n}.parquet", buffer.getvalue())
        atomic_write_json(self.dir / f"part-{n}.json", sums)
