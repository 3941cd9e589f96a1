"""What produced a result: library versions, file hashes and model fingerprints.

Every stage writes these next to its output so a run can be reproduced and a run
directory can refuse to be mixed with another model or data file.
"""

from __future__ import annotations

import hashlib
import json
import platform
import sys
from importlib import metadata
from pathlib import Path

PACKAGES = ("fastv-analysis", "torch", "transformers", "numpy", "scipy", "polars", "safetensors")


def versions() -> dict[str, str]:
    out = {"python": sys.version.split()[0], "platform": platform.platform()}
    for name in PACKAGES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = "not installed"
    return out


def file_sha256(path: str | Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


WHOLE_FILE_BYTES = 64 << 20


def checkpoint_fingerprint(path: str | Path) -> str:
    """Content fingerprint of a local checkpoint folder, independent of the dtype it is loaded in.

    Hashes config.json and each weight file: whole files up to 64 MiB (the toy model),
    otherwise name, size, the first and the last MiB (the safetensors header with every
    tensor's name, shape and offset is at the start) — enough to tell checkpoints apart
    without reading 14 GB of a 7B model.
    """
    root = Path(path)
    h = hashlib.sha256()
    if (root / "config.json").exists():
        h.update((root / "config.json").read_bytes())
    for f in sorted(root.glob("*.safetensors")) + sorted(root.glob("*.bin")):
        size = f.stat().st_size
        h.update(f"{f.name}:{size}".encode())
        with open(f, "rb") as fh:
            if size <= WHOLE_FILE_BYTES:
                h.update(fh.read())
            else:
                h.update(fh.read(1 << 20))
                fh.seek(size - (1 << 20))
                h.update(fh.read())
    return h.hexdigest()[:16]


def local_checkpoint(name: str) -> Path | None:
    """The folder a model name loads from: the path itself, or its snapshot in the HF cache."""
    if Path(name).is_dir():
        return Path(name)
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(name, local_files_only=True))
    except Exception:  # not a hub id, or not in the cache
        return None


def fingerprint(name: str, model) -> str:
    """The model's fingerprint for run.json: from its checkpoint files where they are on disk
    (so loading in another dtype is the same model), else from the weights in memory."""
    folder = local_checkpoint(name)
    return checkpoint_fingerprint(folder) if folder is not None else model_fingerprint(model)


def model_fingerprint(model) -> str:
    """Fingerprint of an in-memory model: parameter names, shapes and a value checksum."""
    import torch

    h = hashlib.sha256()
    with torch.no_grad():
        for name, p in model.state_dict().items():
            h.update(f"{name}:{tuple(p.shape)}:{p.dtype}".encode())
            flat = p.detach().flatten()
            if flat.numel():
                sample = flat[:: max(1, flat.numel() // 64)].float().cpu().numpy().tobytes()
                h.update(sample)
    return h.hexdigest()[:16]


# ----------------------------------------------------------------------------------------
# Stage inputs: each stage records the fingerprint of what it read, so stale results are
# refused instead of mixed (a select re-run after eval, a capture extended after select)
# ----------------------------------------------------------------------------------------


def capture_fingerprint(run) -> str:
    """What the select stage reads from a capture: model, data, layers, storage and the
    captured samples (extending a capture changes it; resuming without new samples does not)."""
    import hashlib

    keys = ("model_fingerprint", "data_sha256", "agg_layers", "queries", "store_dtype")
    head = json.dumps({k: run.config.get(k) for k in keys}, sort_keys=True)
    ids = ",".join(str(i) for i in sorted(run.samples["sample_id"].to_list())) if run.samples.height else ""
    return hashlib.sha256(f"{head}|{ids}".encode()).hexdigest()[:16]


def select_fingerprint(root: str | Path) -> str | None:
    """What eval reads from the select stage: its kept sets (None if select has not run)."""
    path = Path(root) / "select" / "selections.parquet"
    return file_sha256(path)[:16] if path.exists() else None


def stale_stages(run) -> dict[str, str]:
    """Stage name -> one line, for each stage whose recorded input no longer matches what
    is on disk now (``{}`` when everything is consistent)."""
    root = Path(run.root)
    problems = {}
    select_json, eval_json = root / "select" / "select.json", root / "eval" / "eval.json"
    if select_json.exists():
        made_from = json.loads(select_json.read_text()).get("capture_fingerprint")
        if made_from != capture_fingerprint(run):
            problems["select"] = (f"{root / 'select'} was made from another state of the capture (samples or "
                                  f"settings changed since): run `fastv-analyze select {root}` again")
    if eval_json.exists():
        made_from = json.loads(eval_json.read_text()).get("select_fingerprint")
        if made_from != select_fingerprint(root):
            problems["eval"] = (f"{root / 'eval'} was made from other selections (select ran again since): run "
                                f"`fastv-analyze eval {root}` again")
    return problems
