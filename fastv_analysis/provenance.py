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


def checkpoint_fingerprint(path: str | Path) -> str:
    """Cheap, content-based fingerprint of a local checkpoint folder.

    Hashes config.json and, for each weight file, its name, size, safetensors header
    (tensor names, shapes, offsets) and first MiB of data: enough to tell checkpoints
    apart without reading 14 GB of a 7B model.
    """
    root = Path(path)
    h = hashlib.sha256()
    for name in ("config.json",):
        if (root / name).exists():
            h.update((root / name).read_bytes())
    for f in sorted(root.glob("*.safetensors")) + sorted(root.glob("*.bin")):
        h.update(f.name.encode())
        h.update(str(f.stat().st_size).encode())
        with open(f, "rb") as fh:
            h.update(fh.read(1 << 20))
    return h.hexdigest()[:16]


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
