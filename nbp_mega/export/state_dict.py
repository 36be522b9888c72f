"""A plain state-dict file of a trained model (TP=1, nbp_mega's names, padded rows kept).

    write_state_dict(cfg, weights, "x.pt", dtype=torch.bfloat16)
    cfg, state = read_state_dict("x.pt")         # what generate.load_trained_model builds from

The file is one torch.save dict, loadable with weights_only=True:
    {"format": "nbp_mega.state_dict", "version": 1, "config": the run's config (dict),
     "dtype": "float32" | "bfloat16", "source": the checkpoint folder, "state_dict": {...}}
"""

from __future__ import annotations

import os

import torch

FORMAT, VERSION = "nbp_mega.state_dict", 1


def write_state_dict(cfg, weights, path: str, *, dtype=torch.float32, progress=None) -> dict:
    """Gather every tensor of `weights` (Weights) into one file, atomically."""
    from nbp_mega.config import to_dict

    if os.path.exists(path):
        raise FileExistsError(f"{path} exists: expected a new file (nothing was written)")
    state = {}
    for name, tensor in weights.tensors():
        state[name] = tensor.to(dtype)
        if progress is not None:
            progress(name)
    tmp = f"{path}.partial-{os.getpid()}"
    try:
        torch.save({"format": FORMAT, "version": VERSION, "config": to_dict(cfg),
                    "dtype": str(dtype).removeprefix("torch."), "source": weights.path,
                    "state_dict": state}, tmp)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    return {"path": path, "tensors": len(state),
            "bytes": sum(t.numel() * t.element_size() for t in state.values())}


def read_state_dict(path: str):
    """(Config, fp32 state dict) of a file written by write_state_dict, or a ValueError
    naming what the file is instead."""
    from nbp_mega.config import config_from_dict

    try:
        blob = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as e:  # noqa: BLE001 (torch raises many kinds for a bad file)
        raise ValueError(f"{path}: not a readable nbp_mega state-dict file ("
                         f"{type(e).__name__}: {e}); expected one written by "
                         "tools/convert_to_hf.py --state-dict") from None
    if not isinstance(blob, dict) or blob.get("format") != FORMAT:
        raise ValueError(f"{path}: not an nbp_mega state-dict file (format "
                         f"{blob.get('format') if isinstance(blob, dict) else type(blob)!r}, "
                         f"expected {FORMAT!r})")
    if blob.get("version") != VERSION:
        raise ValueError(f"{path}: state-dict format version {blob.get('version')}, this "
                         f"nbp_mega reads version {VERSION}")
    return config_from_dict(blob["config"]), {k: v.float() for k, v in
                                               blob["state_dict"].items()}
