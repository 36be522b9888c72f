"""Exports of trained models: a Hugging Face folder (hf.py) and a plain state dict
(state_dict.py), both streamed from a training checkpoint of any ZeRO stage and TP size
(weights.py)."""

from nbp_mega.export.hf import ExportError, export_hf
from nbp_mega.export.state_dict import read_state_dict, write_state_dict
from nbp_mega.export.weights import Weights, open_checkpoint

__all__ = ["Weights", "ExportError", "export_hf", "open_checkpoint",
           "read_state_dict", "write_state_dict"]
