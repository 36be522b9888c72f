"""An evaluation's files: OUT/results.json (every number, the protocol, the checksums),
OUT/summary.md with its plots, and TensorBoard scalars for periodic evaluation of a run."""

from __future__ import annotations

import dataclasses
import json
import os

import numpy as np


def markdown_table(header: list[str], rows: list[list]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return lines + ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]


def _fmt(x, digits: int = 4) -> str:
    return "n/a" if x is None else f"{x:.{digits}g}"


def model_name(name: str, path: str) -> str:
    """The label of an evaluated model: its config's name, else its file or folder name."""
    return name or os.path.basename(os.path.normpath(path)) if (name or path) else "model"


def _pct(x) -> str:
    return "n/a" if x is None else f"{100 * x:.2f}%"


def write_results(cfg, results: dict) -> dict:
    """results.json (config included), the plots and summary.md under cfg.out -> file paths."""
    from nbp_mega.eval.per_block import plot_position_scores

    os.makedirs(cfg.out, exist_ok=True)
    files = {"results": os.path.join(cfg.out, "results.json"),
             "summary": os.path.join(cfg.out, "summary.md")}
    name = model_name(cfg.name, cfg.run or cfg.generated)
    if results.get("per_block"):
        files["per_block_plot"] = os.path.join(cfg.out, "per_block.png")
        plot_position_scores({name: results["per_block"]}, results["model"]["grid"],
                             files["per_block_plot"])
    if results.get("temporal"):
        files["temporal_plot"] = os.path.join(cfg.out, "temporal.png")
        plot_temporal({name: results["temporal"]}, files["temporal_plot"])
    record = {"config": dataclasses.asdict(cfg), **results, "files": files}
    with open(files["results"] + ".tmp", "w") as f:
        json.dump(record, f, indent=1)
    os.replace(files["results"] + ".tmp", files["results"])
    with open(files["summary"], "w") as f:
        f.write("\n".join(summary_lines(name, cfg, results, files)) + "\n")
    return files


def summary_lines(name: str, cfg, r: dict, files: dict) -> list[str]:
    lines = [f"# Evaluation of {name}", ""]
    if r.get("model"):
        lines += [f"Model: `{r['model']['path']}` (weights sha256 "
                  f"`{r['model']['weights_sha256'][:16]}`)"]
    if r.get("tokenizer"):
        lines += [f"Tokenizer: `{r['tokenizer']['path']}` (sha256 "
                  f"`{r['tokenizer']['sha256'][:16]}`)"]
    images = {"per_block": ("per_block_plot", "![per latent row](per_block.png)"),
              "temporal": ("temporal_plot", "![frame change](temporal.png)")}
    sections = {"fvd": lambda x: _fvd_lines(cfg.fvd, x), "per_block": _per_block_lines,
                "temporal": _temporal_lines, "tokenizer_reconstruction": _tokenizer_lines}
    for key, section in sections.items():
        if r.get(key):
            lines += ["", *section(r[key])]
            if key in images and images[key][0] in files:
                lines += ["", images[key][1]]
    return lines + ["", "Timings (s): " + ", ".join(f"{k} {v:.1f}" for k, v in
                                                     r["timings_s"].items()),
                    "", "Every number, the config and the checksums: `results.json`."]


def _fvd_lines(p, f: dict) -> list[str]:
    size = f"{p.resolution}x{p.resolution}" + (
        f", evaluated at {p.eval_resolution}x{p.eval_resolution}" if p.eval_resolution else "")
    return ["## FVD", "",
            f"Protocol `{p.protocol}`: the first {p.frames} frames at {size}; "
            f"{f['samples_per_fold']} generated clips x {len(f['folds'])} folds vs "
            f"{f['reference_clips']} real clips" + (f" at {p.fps:g} fps" if p.fps else "")
            + (f"; the first {p.context_frames} frames given" if p.context_frames else "")
            + f". Detector sha256 `{f['detector']['sha256'][:16]}`.", "",
            *markdown_table(["FVD (mean over folds)", "std", "folds"],
                            [[f"{f['fvd']:.2f}", f"{f['fvd_std']:.2f}",
                              ", ".join(f"{x:.2f}" for x in f["folds"])]])]


def _per_block_lines(b: dict) -> list[str]:
    rows = [[t, _fmt(loss), _pct(acc)] for t, (loss, acc) in
            enumerate(zip(b["frame"]["loss"], b["frame"]["accuracy"], strict=True))]
    return ["## Validation by position", "",
            f"{b['clips']} validation clips: loss {b['loss']:.4f} nats per token, top-1 "
            f"accuracy {100 * b['accuracy']:.2f}%.", "",
            *markdown_table(["latent frame", "loss", "accuracy"], rows)]


def _temporal_lines(t: dict) -> list[str]:
    rows = [[k, t[k]["clips"], f"{t[k]['mean_change']:.4f}", f"{t[k]['flicker']:.3f}"]
            for k in ("generated", "real")]
    return ["## Temporal consistency", "",
            *markdown_table(["", "clips", "mean frame change", "flicker"], rows), "",
            f"Generated / real: change {t['mean_change_ratio']:.2f}x, flicker "
            f"{t['flicker_ratio']:.2f}x; the largest jump is frame {t['worst_step']} -> "
            f"{t['worst_step'] + 1} ({t['worst_step_ratio']:.2f}x real's change there)."]


def _tokenizer_lines(k: dict) -> list[str]:
    return ["## Tokenizer reconstruction", "",
            *markdown_table(["clips", "frames", "PSNR (dB)", "SSIM", "codes used", "perplexity"],
                            [[k["clips"], k["frames"], f"{k['psnr']:.2f}", f"{k['ssim']:.4f}",
                              _pct(k["codes_used_fraction"]), f"{k['perplexity']:.1f}"]])]


def plot_temporal(temporal: dict[str, dict], path: str) -> None:
    """PNG: mean frame change per step of each model's generated clips and of the real ones."""
    from nbp_mega.eval.plots import pyplot, save

    fig, ax = pyplot().subplots(figsize=(7, 4))
    real = next(iter(temporal.values()))["real"]["profile"]
    ax.plot(np.arange(len(real)), real, "k--", label="real")
    for name, t in temporal.items():
        ax.plot(np.arange(len(real)), t["generated"]["profile"], "o-", ms=3, label=name)
    ax.set(xlabel="frame t -> t + 1", ylabel="mean |change| per pixel (0-1 scale)",
           title="Frame-to-frame change: generated vs real clips")
    save(fig, path, legends=[ax])


def scalars(results: dict) -> dict[str, float]:
    """The numbers TensorBoard shows for a periodic evaluation (tag -> value)."""
    out = {}
    if results.get("fvd"):
        out["eval/fvd"] = results["fvd"]["fvd"]
    if results.get("per_block"):
        b = results["per_block"]
        out["eval/val_loss"], out["eval/val_accuracy"] = b["loss"], b["accuracy"]
        for view in ("frame",):
            for key in ("loss", "accuracy"):
                for i, x in enumerate(b[view][key]):
                    if x is not None:
                        out[f"eval_{key}_by_{view}/{i:03d}"] = x
    if results.get("temporal"):
        out["eval/flicker_ratio"] = results["temporal"]["flicker_ratio"]
        out["eval/mean_change_ratio"] = results["temporal"]["mean_change_ratio"]
    if results.get("tokenizer_reconstruction"):
        out["eval/tokenizer_psnr"] = results["tokenizer_reconstruction"]["psnr"]
    return out


# -- several evaluations side by side --------------------------------------------------------
PROTOCOL_KEYS = ("protocol", "frames", "resolution", "eval_resolution", "fps", "samples",
                 "folds", "reference_clips", "context_frames")


def write_comparison(result_dirs: list[str], out: str) -> dict:
    """OUT/comparison.md (+ per_block.png, temporal.png) of evaluations' results.json: one
    table row per model; FVDs of another protocol or detector than the first are marked."""
    from nbp_mega.eval.per_block import plot_position_scores

    runs = {}
    for d in result_dirs:
        path = os.path.join(d, "results.json")
        if not os.path.isfile(path):
            raise FileNotFoundError(f"{d}: no results.json (expected an evaluation's OUT folder)")
        with open(path) as f:
            r = json.load(f)
        name = model_name(r["config"]["name"], r["config"]["run"] or r["config"]["generated"])
        if name in runs:  # the same model evaluated twice (another protocol, checkpoint...)
            name = f"{name} ({os.path.basename(os.path.normpath(d))})"
        runs[name] = r
    os.makedirs(out, exist_ok=True)
    files = {"comparison": os.path.join(out, "comparison.md")}
    blocks = {k: r for k, r in runs.items() if r.get("per_block")}
    if blocks:
        grids = {tuple(r["model"]["grid"]) for r in blocks.values()}
        if len(grids) > 1:
            raise ValueError(f"per-block scores of different latent grids {sorted(grids)}: "
                             "expected models of one grid")
        files["per_block_plot"] = os.path.join(out, "per_block.png")
        plot_position_scores({k: r["per_block"] for k, r in blocks.items()}, list(grids.pop()),
                             files["per_block_plot"])
    temporal = {k: r["temporal"] for k, r in runs.items() if r.get("temporal")}
    if temporal:
        files["temporal_plot"] = os.path.join(out, "temporal.png")
        plot_temporal(temporal, files["temporal_plot"])
    with open(files["comparison"], "w") as f:
        f.write("\n".join(comparison_lines(runs, files)) + "\n")
    return files


def _protocol(r: dict) -> tuple:
    p = r["config"]["fvd"]
    return (tuple(p[k] for k in PROTOCOL_KEYS), r["fvd"]["detector"]["sha256"])


def comparison_lines(runs: dict[str, dict], files: dict) -> list[str]:
    first = next((_protocol(r) for r in runs.values() if r.get("fvd")), None)
    rows = []
    for name, r in runs.items():
        f, b, t = r.get("fvd"), r.get("per_block"), r.get("temporal")
        mark = "" if not f or _protocol(r) == first else " (other protocol)"
        rows.append([name, f"{f['fvd']:.2f} +- {f['fvd_std']:.2f}{mark}" if f else "n/a",
                     f"{b['loss']:.4f}" if b else "n/a", _pct(b["accuracy"]) if b else "n/a",
                     f"{t['flicker_ratio']:.2f}x" if t else "n/a",
                     f"{t['mean_change_ratio']:.2f}x" if t else "n/a"])
    lines = ["# Evaluations compared", "",
             *markdown_table(["model", "FVD", "val loss", "val accuracy", "flicker vs real",
                              "change vs real"], rows)]
    if first is not None:
        lines += ["", "FVD protocol: " + ", ".join(f"{k} {v}" for k, v in
                                                    zip(PROTOCOL_KEYS, first[0], strict=True))
                  + f"; detector sha256 `{first[1][:16]}`."]
    for key, title in (("per_block_plot", "![per latent row](per_block.png)"),
                       ("temporal_plot", "![frame change](temporal.png)")):
        if key in files:
            lines += ["", title]
    return lines
