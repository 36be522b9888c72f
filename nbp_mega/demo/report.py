"""The demo report: OUT/report/report.md with PNG plots, and stats.json with its numbers.

Legend: N clips; F frames; R side in pixels; T, H, W latent grid.

    results = analyse(out, scale, tokenizer)    # plots + numbers (loads both models)
    write_markdown(out, scale, results, stages, total_seconds) -> path of report.md

Plots: loss_curves.png (training and validation loss of both runs, from metrics.jsonl),
per_block.png (validation loss and accuracy per latent row, computed from the trained weights
on the validation shards: nbp_mega.eval.per_block), contact_sheet.png (per class: real clips,
NBP samples, NTP samples), temporal.png (frame-to-frame change of the samples against the real
clips: nbp_mega.eval.temporal).
"""

from __future__ import annotations

import json
import os

import numpy as np

from nbp_mega.demo import analysis
from nbp_mega.demo.videos import CLASSES
from nbp_mega.eval.per_block import plot_position_scores
from nbp_mega.eval.plots import pyplot, save
from nbp_mega.eval.report import plot_temporal

MODELS = ("nbp", "ntp")
COLOURS = {"nbp": "tab:blue", "ntp": "tab:orange"}


# -- inputs ----------------------------------------------------------------------------------
def real_clips(out: str, scale, per_class: int) -> tuple[list[np.ndarray], list[int]]:
    """The first per_class validation clips of each class: uint8 [F, R, R, 3] each."""
    from nbp_mega.data.video import list_videos, read_clips

    clips, labels = [], []
    for k, cls in enumerate(CLASSES):
        for path in list_videos(os.path.join(out, "videos", "val", cls.name))[:per_class]:
            clips.append(read_clips(path, frames=scale.frames, resolution=scale.size)[0])
            labels.append(k)
    return clips, labels


def decode(tokenizer, tokens: np.ndarray) -> list[np.ndarray]:
    """Token grids [N, T, H, W] -> uint8 clips [F, R, R, 3] (the pixels the MP4s hold)."""
    import torch

    from nbp_mega.generate.outputs import decode_tokens, to_uint8_frames

    videos = decode_tokens(tokenizer, torch.from_numpy(tokens.astype(np.int64)))
    return [to_uint8_frames(v) for v in videos]


def reconstruct(tokenizer, clips: list[np.ndarray]) -> list[np.ndarray]:
    import torch

    tokens = tokenizer.encode(torch.from_numpy(np.stack(clips)))
    return decode(tokenizer, tokens.numpy())


def read_samples(out: str, model: str) -> tuple[dict, np.ndarray]:
    folder = os.path.join(out, "samples", model)
    with open(os.path.join(folder, "samples.json")) as f:
        meta = json.load(f)
    return meta, np.load(os.path.join(folder, "tokens.npy"))


# -- plots -----------------------------------------------------------------------------------
def plot_losses(out: str, path: str) -> dict:
    """Training loss per step and validation loss per evaluation, both models -> finals."""
    from nbp_mega.metrics import read_metrics

    plt, summary = pyplot(), {}
    fig, ax = plt.subplots(figsize=(7, 4))
    for model in MODELS:
        train, evals = read_metrics(os.path.join(out, model, "metrics.jsonl"))
        steps, loss = [r["step"] for r in train], [r["loss"] for r in train]
        ax.plot(steps, loss, color=COLOURS[model], alpha=0.5, lw=1,
                label=f"{model.upper()} train")
        ax.plot([r["step"] for r in evals], [r["val_loss"] for r in evals], "o-",
                color=COLOURS[model], label=f"{model.upper()} validation")
        summary[model] = {"first_loss": loss[0], "last_loss": loss[-1], "steps": steps[-1],
                          "val_loss": [(r["step"], r["val_loss"]) for r in evals],
                          "median_step_s": float(np.median([r["step_seconds"] for r in train])),
                          "median_tokens_per_s": float(np.median([r["tokens_per_s"]
                                                                  for r in train]))}
    ax.set(xlabel="optimizer step", ylabel="loss (nats per token)", ylim=(0, None),
           title="Loss: NBP (rows of 8) vs NTP (1x1x1), same data and steps")
    save(fig, path, legends=[ax])
    return summary


def validation_scores(out: str, scale) -> dict[str, dict]:
    """{model: nbp_mega.eval.per_block.position_scores} from each run's final weights on the
    validation shards: loss and accuracy per block, latent frame and latent row."""
    import torch

    from nbp_mega.data.shards import ShardIndex, expand_shards
    from nbp_mega.eval.per_block import position_scores
    from nbp_mega.generate.load import load_trained_model
    from nbp_mega.parallel.dims import ParallelConfig, init_parallel, shutdown_parallel

    index = ShardIndex.build(expand_shards(os.path.join(out, "shards", "val")))
    joined = not torch.distributed.is_initialized()  # an in-process caller keeps its job
    dims, scores = init_parallel(ParallelConfig(tensor=1)), {}
    try:
        for model_name in MODELS:
            model, _ = load_trained_model(os.path.join(out, model_name), dims=dims)
            scores[model_name] = position_scores(model, index, batch_size=scale.global_batch,
                                                 max_batches=scale.eval_batches, dims=dims)
    finally:
        index.close()
        if joined:
            shutdown_parallel()
    return scores


def temporal_consistency(real: list[np.ndarray], generated: dict[str, list[np.ndarray]]
                         ) -> dict[str, dict]:
    """{model: nbp_mega.eval.temporal.compare} of its clips against the real ones."""
    import torch

    from nbp_mega.eval.temporal import TemporalStats, compare

    def stats(clips):  # uint8 [F, R, R, 3] each -> [N, 3, F, R, R] in [0, 1]
        video = torch.from_numpy(np.stack(clips)).permute(0, 4, 1, 2, 3).float() / 255
        return TemporalStats().update(video)

    reference = stats(real)
    return {model: compare(stats(clips), reference) for model, clips in generated.items()}


def _strip(clips: list[np.ndarray], gap: int = 2) -> np.ndarray:
    """Clips as rows of frames, white gaps -> uint8 [rows, cols, 3]."""
    F, R = clips[0].shape[:2]
    sheet = np.full((len(clips) * (R + gap) - gap, F * (R + gap) - gap, 3), 255, np.uint8)
    for r, clip in enumerate(clips):
        for f in range(F):
            sheet[r * (R + gap):r * (R + gap) + R, f * (R + gap):f * (R + gap) + R] = clip[f]
    return sheet


def plot_contact_sheet(groups: dict[str, tuple[list[np.ndarray], list[int]]], path: str) -> None:
    """One panel per class (2 x 2); rows: each group's clips of that class, in group order."""
    plt = pyplot()
    fig, axes = plt.subplots(2, 2, figsize=(12, 10))
    for k, (ax, cls) in enumerate(zip(axes.flat, CLASSES, strict=True)):
        clips, names = [], []
        for group, (videos, labels) in groups.items():
            mine = [v for v, y in zip(videos, labels, strict=True) if y == k]
            clips += mine
            names += [f"{group} {i + 1}" for i in range(len(mine))]
        ax.imshow(_strip(clips), interpolation="nearest")
        R = clips[0].shape[1] + 2
        ax.set_yticks([r * R + R / 2 - 1 for r in range(len(clips))], names, fontsize=8)
        ax.set_xticks([f * R + R / 2 - 1 for f in range(clips[0].shape[0])],
                      range(clips[0].shape[0]), fontsize=7)
        ax.set_title(f"class {k}: {cls.name[2:].replace('_', ', moves ')}", fontsize=10)
        ax.set_xlabel("frame", fontsize=8)
    fig.suptitle("Per class: validation clips (real), the same through the tokenizer (tok), "
                 "and generated clips (NBP, NTP)", fontsize=11)
    save(fig, path, dpi=110)


# -- numbers ---------------------------------------------------------------------------------
def speed_rows(samples: dict[str, dict], frames: int) -> list[dict]:
    """The speed table, from each samples.json (its timings and shape)."""
    rows = []
    for model, meta in samples.items():
        n, seconds = meta["shape"][0], meta["timings"]["generation_s"]
        tokens = int(np.prod(meta["shape"]))
        rows.append({"model": model.upper(), "block_shape": meta["model"]["block_shape"],
                     "clips": n, "batch": meta["settings"]["batch_size"],
                     "steps": meta["steps"], "generation_s": seconds,
                     "s_per_clip": seconds / n, "tokens_per_s": tokens / seconds,
                     "frames_per_s": n * frames / seconds,
                     "decode_s": meta["timings"]["decode_s"]})
    base = next((r for r in rows if r["model"] == "NTP"), None)
    for r in rows:
        r["speedup_vs_ntp"] = base["generation_s"] / r["generation_s"] if base else None
    return rows


def analyse(out: str, scale, tokenizer_path: str) -> dict:
    """Every plot and number of the report (OUT/report/*.png, OUT/report/stats.json)."""
    from nbp_mega.demo.tokenizer import load_demo_tokenizer

    folder = os.path.join(out, "report")
    os.makedirs(folder, exist_ok=True)
    tokenizer = load_demo_tokenizer(tokenizer_path, sha256="")  # checked by its stage
    results = {"losses": plot_losses(out, os.path.join(folder, "loss_curves.png"))}
    results["per_block"] = validation_scores(out, scale)
    results["loss_by_row"] = {m: s["row"]["loss"] for m, s in results["per_block"].items()}
    plot_position_scores({m.upper(): s for m, s in results["per_block"].items()}, scale.grid,
                         os.path.join(folder, "per_block.png"))
    real, labels = real_clips(out, scale, scale.samples_per_class)
    recon = reconstruct(tokenizer, real)
    shown = [i for i in range(len(real)) if i % scale.samples_per_class < 2]  # 2 per class
    groups, samples = {"real": ([real[i] for i in shown], [labels[i] for i in shown]),
                       "tok": ([recon[i] for i in shown], [labels[i] for i in shown])}, {}
    for model in MODELS:
        meta, tokens = read_samples(out, model)
        samples[model] = meta
        groups[model.upper()] = (decode(tokenizer, tokens), meta["labels"])
    plot_contact_sheet(groups, os.path.join(folder, "contact_sheet.png"))
    results["temporal"] = temporal_consistency(real, {m: groups[m][0] for m in ("NBP", "NTP")})
    plot_temporal(results["temporal"], os.path.join(folder, "temporal.png"))
    results["stats"] = {name: analysis.class_summary(clips, y)
                        for name, (clips, y) in {"real": (real, labels),
                                                 "real through the tokenizer": (recon, labels),
                                                 "NBP": groups["NBP"],
                                                 "NTP": groups["NTP"]}.items()}
    results["tokenizer"] = {"path": tokenizer_path, "sha256": tokenizer.checksum(),
                            "codebook": tokenizer.codebook_size,
                            "psnr_db": float(np.mean([analysis.psnr(a, b)
                                                      for a, b in zip(real, recon,
                                                                      strict=True)]))}
    results["speed"] = speed_rows(samples, scale.frames)
    results["samples"] = {m: {"files": meta["files"], "seeds": meta["seeds"],
                              "labels": meta["labels"]} for m, meta in samples.items()}
    with open(os.path.join(folder, "stats.json"), "w") as f:
        json.dump(results, f, indent=1)
    return results
