"""The evaluation config (tools/evaluate.py CONFIG): what to evaluate, on what, how.

YAML merged strictly over these defaults, then `key=value` overrides; the `fvd` section starts
from its protocol's preset (nbp_mega.eval.fvd.PRESETS) and its own keys override the preset.
"""

from __future__ import annotations

import dataclasses

from nbp_mega.config_fields import ConfigError, check, deep_merge, merge, option, parse_overrides
from nbp_mega.eval.fvd import FVDConfig, fvd_config
from nbp_mega.generate.sampling import SamplingConfig

METRICS = ("fvd", "per_block", "temporal", "tokenizer")
NEEDS_VIDEOS = ("fvd", "temporal", "tokenizer")


@dataclasses.dataclass
class PerBlockConfig:
    val_shards: str = option("", "validation token shards (empty: the run's data.val_shards)")
    batch_size: int = option(8, "clips per forward", min=1)
    max_batches: int = option(16, "batches of the validation shards scored", min=1)


@dataclasses.dataclass
class TemporalConfig:
    clips: int = option(64, "generated clips (fold 0's first) and real clips compared", min=1)


@dataclasses.dataclass
class TokenizerEvalConfig:
    clips: int = option(64, "real clips encoded and decoded", min=1)


@dataclasses.dataclass
class EvalConfig:
    run: str = option("", "the model: run directory, checkpoint folder or state-dict file")
    checkpoint: str = option("", "checkpoint name inside the run (empty: latest)")
    name: str = option("", "the model's label in the summary (empty: its folder's name)")
    tokenizer: str = option("", "video tokenizer (file or preset) the model's shards used")
    videos: str = option("", "folder of real videos: FVD reference set, frame-prediction "
                         "contexts, tokenizer reconstructions")
    generated: str = option("", "folder of generated videos (say, another model's samples) "
                            "evaluated instead of sampling `run` (fvd, temporal): the first "
                            "frames of each file, one clip per file, in file order")
    out: str = option("runs/eval", "output folder: results.json, summary.md, plots, stats/")
    reference_stats: str = option("", "the reference set's statistics file (empty: "
                                  "OUT/stats/reference.npz); reused when it records this "
                                  "set, protocol and detector, refused when it does not")
    metrics: list[str] = option(list(METRICS), "which of " + ", ".join(METRICS))
    device: str = option("cpu", "cpu (gloo) or cuda (nccl; each rank its local GPU)",
                         choices=["cpu", "cuda"])
    fvd: FVDConfig = dataclasses.field(default_factory=FVDConfig)
    sampling: SamplingConfig = dataclasses.field(default_factory=SamplingConfig)
    per_block: PerBlockConfig = dataclasses.field(default_factory=PerBlockConfig)
    temporal: TemporalConfig = dataclasses.field(default_factory=TemporalConfig)
    tokenizer_eval: TokenizerEvalConfig = dataclasses.field(default_factory=TokenizerEvalConfig)

    def wants(self, metric: str) -> bool:
        return metric in self.metrics

    def validate(self) -> None:
        unknown = [m for m in self.metrics if m not in METRICS]
        if unknown or not self.metrics:
            raise ConfigError(f"metrics={self.metrics}: expected a non-empty list of "
                              f"{', '.join(METRICS)}")
        generating = () if self.generated else ("fvd", "temporal")  # else: the model samples
        needs = {"run": ("per_block", *generating), "videos": NEEDS_VIDEOS,
                 "tokenizer": ("tokenizer", *generating)}
        for key, metrics in needs.items():
            used = [m for m in self.metrics if m in metrics]
            if used and not getattr(self, key):
                raise ConfigError(f"metrics {', '.join(used)} need '{key}' (empty): expected "
                                  f"{EvalConfig.__dataclass_fields__[key].metadata['help']}")
        if self.wants("fvd") and not self.fvd.detector:
            raise ConfigError("metric fvd needs fvd.detector: the path of StyleGAN-V's "
                              "i3d_torchscript.pt (nothing is downloaded)")


def load_eval_config(path: str | None, overrides: list[str] | None = None) -> EvalConfig:
    from nbp_mega.config import read_yaml

    data = deep_merge(read_yaml(path) if path else {}, parse_overrides(overrides or []))
    section = data.pop("fvd", None)
    if section is not None and not isinstance(section, dict):
        raise ConfigError(f"config section 'fvd': expected a mapping of keys, got {section!r}")
    cfg = dataclasses.replace(merge(EvalConfig(), data), fvd=fvd_config(section))
    check(cfg)
    return cfg
