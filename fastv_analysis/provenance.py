"""What produced a result: library versions, file hashes and model fingerprints.

Every stage writes these next to its output so a run can be reproduced and a run
directory can refuse to be mixed with another model or data file.
"""

from __future__ import annotations

import hashlib
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
