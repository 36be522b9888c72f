"""The text of the demo report (OUT/report/report.md) from `report.analyse`'s numbers.

Every number in it comes from this run's files (metrics.jsonl, samples.json, the stats of
the clips); the one paragraph that does not, "By eye", is what a person saw in the clips of
the default-scale demo on the date it names, and is marked as such.
"""

from __future__ import annotations

import os
import platform
import time

from nbp_mega.demo.analysis import DIRECTIONS
from nbp_mega.demo.videos import CLASSES
from nbp_mega.eval.report import markdown_table

# What the contact sheet of `make demo` (default scale, seed 0) showed when looked at; shown
# only for that scale. Update it when the demo changes (tools/demo.py, then look at
# runs/demo/report/contact_sheet.png).
BY_EYE = """\
- Every NBP clip shows one blob in its class's colour (red, green, blue, yellow) over a grey
  gradient background like the real ones. None is a square: the blobs are soft-edged (so are
  the tokenizer's own reconstructions, the "tok" rows), duller than the real colour, and in
  the first frames often split in two or stretched into a vertical streak that merges into
  one blob later. Most move the class's way (the red ones right, the green ones down, the
  blue ones left, if slowly); one yellow clip drifts up and right and one fades into a thin
  streak. Shape and brightness sometimes jump at a latent-frame boundary (frame 4 to 5).
- The NTP clips have the right colours too, and some blobs are more compact than NBP's, but
  several fade out during the clip (two green, two blue, one red), one yellow blob appears
  from nothing at frame 5, and motion is less consistent (the table's "frames with a
  square" and "motion ok" columns say the same).
- Neither model gives crisp squares or a constant size; as a sanity check of class
  conditioning and of NBP's block-at-a-time sampling they work, as a video model they are
  what 500 CPU steps of a 4-layer model buy."""
BY_EYE_DATE = "2026-12-02, the development machine, 500 steps"


def _pct(x: float) -> str:
    return f"{100 * x:.0f}%"


def stage_section(stages, total: float) -> list[str]:
    rows = [[s.name, f"{s.seconds:.1f}", s.busy] for s in stages]
    rows.append(["**total** (report writing included)", f"**{total:.1f}**", ""])
    return ["## Stages", "",
            f"On {platform.node() or 'this machine'} ({os.cpu_count()} cores), "
            f"{time.strftime('%Y-%m-%d %H:%M')}. \"Others\" is the CPU time processes outside "
            "the demo took meanwhile, as a share of all cores (nbp_mega.machine_load), and "
            "the 1-minute load average at the stage's end: where they are high, every time "
            "here is longer than on a quiet machine.", "",
            *markdown_table(["stage", "seconds", "machine"], rows), ""]


def data_section(scale, results) -> list[str]:
    rows = [[k, c.name[2:], str(c.colour), DIRECTIONS[c.direction], scale.train_per_class,
             scale.val_per_class] for k, c in enumerate(CLASSES)]
    tok = results["tokenizer"]
    return ["## Data and tokenizer", "",
            f"Synthetic clips of {scale.frames} frames at {scale.size}x{scale.size} pixels "
            "(H.264 files under `videos/`): one square over a grey gradient; the class fixes "
            "its colour and the direction it moves in (speed, size, position and brightness "
            "vary).", "", *markdown_table(["class", "name", "colour (RGB)", "moves",
                                           "train clips", "val clips"], rows), "",
            f"Tokenizer `{os.path.basename(tok['path'])}` (tiny-s4 with {tok['codebook']} FSQ "
            f"codes, sha256 `{tok['sha256'][:16]}...` checked): {scale.frames}x{scale.size}x"
            f"{scale.size} pixels -> {'x'.join(map(str, scale.grid))} tokens. Validation clips "
            f"encoded and decoded by it: **{tok['psnr_db']:.1f} dB** PSNR on average.", ""]


def training_section(scale, results) -> list[str]:
    rows = []
    for model, s in results["losses"].items():
        val = s["val_loss"][-1][1] if s["val_loss"] else float("nan")
        rows.append([model.upper(), "1x1x8 (a row)" if model == "nbp" else "1x1x1",
                     s["steps"], f"{s['first_loss']:.3f}", f"{s['last_loss']:.3f}",
                     f"{val:.3f}", f"{s['median_step_s']:.2f}",
                     f"{s['median_tokens_per_s']:,.0f}"])
    nbp_rows, ntp_rows = results["loss_by_row"]["nbp"], results["loss_by_row"]["ntp"]
    return ["## Training", "",
            f"Both models: configs/demo_nbp.yaml / demo_ntp.yaml, {scale.steps} steps of "
            f"{scale.global_batch} clips, ZeRO-3 over 2 CPU ranks (launch.sh, "
            "NPROC_PER_NODE=2), class label as a prefix token.", "",
            *markdown_table(["model", "block", "steps", "first train loss", "last train loss",
                             "final val loss", "median step s", "tokens/s"], rows), "",
            "![loss curves](loss_curves.png)", "",
            "Validation loss and top-1 accuracy per latent row of the predicted tokens, from "
            "the final weights on the validation shards (nbp_mega.eval.per_block; NBP "
            "predicts a whole row at once from the rows before it; NTP predicts each token "
            "from everything before it, the earlier tokens of its own row included):", "",
            "![loss and accuracy per row](per_block.png)", "",
            f"NBP: row 0 (from the class token alone) {nbp_rows[0]:.3f}, mean of the other "
            f"rows {sum(nbp_rows[1:]) / max(len(nbp_rows) - 1, 1):.3f}; NTP: row 0 "
            f"{ntp_rows[0]:.3f}, others {sum(ntp_rows[1:]) / max(len(ntp_rows) - 1, 1):.3f} "
            "nats per token; accuracy " + ", ".join(
                f"{m.upper()} {100 * results['per_block'][m]['accuracy']:.1f}%"
                for m in ("nbp", "ntp")) + ".", ""]


def temporal_section(results) -> list[str]:
    rows = []
    for model, t in results["temporal"].items():
        rows.append([model, t["generated"]["clips"], f"{t['generated']['mean_change']:.4f}",
                     f"{t['mean_change_ratio']:.2f}x", f"{t['generated']['flicker']:.3f}",
                     f"{t['flicker_ratio']:.2f}x",
                     f"{t['worst_step']} -> {t['worst_step'] + 1} ({t['worst_step_ratio']:.2f}x)"])
    real = next(iter(results["temporal"].values()))["real"]
    return ["## Temporal consistency", "",
            "Frame-to-frame change of the samples against the real validation clips "
            "(nbp_mega.eval.temporal): mean |change| per pixel (0-1 scale), and flicker = the "
            "std over a clip's frame steps of that change over its mean (the paper's \"screen "
            "fluctuation\" of large blocks shows as high flicker, at block boundaries). Real "
            f"clips: change {real['mean_change']:.4f}, flicker {real['flicker']:.3f}.", "",
            *markdown_table(["samples", "clips", "mean change", "vs real", "flicker", "vs real",
                             "largest step vs real"], rows), "",
            "![frame change](temporal.png)", ""]


def stats_section(results) -> list[str]:
    rows = []
    for source, classes in results["stats"].items():
        for c in classes:
            rows.append([source, c["class"][2:], c["clips"], _pct(c["square_found"]),
                         _pct(c["colour_match"]), _pct(c["direction_match"]),
                         ", ".join(c["directions"]), str(c["colour"]),
                         f"{c['velocity'][0]:+.2f}, {c['velocity'][1]:+.2f}"])
    return ["## Generated clips", "", "![contact sheet](contact_sheet.png)", "",
            "Measured on the pixels (nbp_mega/demo/analysis.py): the square is the saturated "
            "pixels of a frame; \"colour ok\" = its mean colour is nearest to its class's "
            "colour; \"motion ok\" = its centre moves mainly in the class's direction (a "
            "least-squares line through the frames; under 0.4 px/frame is \"still\").", "",
            *markdown_table(["clips", "class", "n", "frames with a square", "colour ok",
                             "motion ok", "directions seen", "mean colour",
                             "velocity dy, dx (px/frame)"], rows),
            "", *summary_lines(results), ""]


def summary_lines(results) -> list[str]:
    """The table in one sentence per model: what matches, on average over the classes."""
    lines = []
    for source in ("NBP", "NTP"):
        classes = results["stats"][source]
        colour = sum(c["colour_match"] for c in classes) / len(classes)
        motion = sum(c["direction_match"] for c in classes) / len(classes)
        found = sum(c["square_found"] for c in classes) / len(classes)
        lines.append(f"- {source}: a square in {_pct(found)} of the frames; its colour is the "
                     f"class's in {_pct(colour)} of the clips, its motion the class's in "
                     f"{_pct(motion)}.")
    return lines


def speed_section(results, stages) -> list[str]:
    rows = [[r["model"], "x".join(map(str, r["block_shape"])), r["clips"], r["batch"],
             r["steps"], f"{r['generation_s']:.2f}", f"{r['s_per_clip']:.3f}",
             f"{r['tokens_per_s']:,.0f}", f"{r['frames_per_s']:.1f}",
             f"{r['speedup_vs_ntp']:.1f}x" if r["speedup_vs_ntp"] else ""]
            for r in results["speed"]]
    busy = [f"{s.name}: {s.busy}" for s in stages if s.name.startswith("sample")]
    return ["## Generation speed", "",
            "From each `samples/<model>/samples.json` (tools/sample.py's `timings.generation_s`:"
            " sampling only, model loading and decoding to pixels excluded), one batch of all "
            "clips, KV cache, CPU fp32.", "",
            *markdown_table(["model", "block", "clips", "batch", "steps per clip",
                             "generation s", "s per clip", "tokens/s", "video frames/s",
                             "speed-up vs NTP"], rows),
            "", "The machine while sampling: " + ("; ".join(busy) or "not measured") +
            " (a busy machine makes both slower and the ratio noisy).", ""]


def by_eye_section(scale) -> list[str]:
    from nbp_mega.demo.pipeline import DemoScale

    if scale != DemoScale() or not BY_EYE:
        return ["## By eye", "", "Not looked at by a person at this scale: judge the "
                "contact sheet above yourself; the table gives the measured facts.", ""]
    return ["## By eye", "", f"What the contact sheet of `make demo` (this scale, seed 0) "
            f"showed when a person looked at it ({BY_EYE_DATE}); a rerun on another machine "
            "may differ in details (the numbers above are this run's):", "", BY_EYE, ""]


def files_section(results) -> list[str]:
    lines = ["## Files", ""]
    for model, s in results["samples"].items():
        videos = [f for f in s["files"] if f.endswith(".mp4")]
        links = ", ".join(f"[{f}](../samples/{model}/{f})" for f in videos)
        lines.append(f"- {model.upper()} samples (class {', '.join(map(str, s['labels']))}): "
                     f"{links}; GIFs and `contact_sheet.png` beside them")
    lines.append("- numbers of this report: [stats.json](stats.json); stage timings: "
                 "[../timings.json](../timings.json); logs: `../logs/`")
    return lines + [""]


def write_markdown(out: str, scale, results: dict, stages, total: float) -> str:
    path = os.path.join(out, "report", "report.md")
    lines = ["# nbp_mega demo: pixels to generated clips, NBP vs NTP", "",
             "Synthetic videos -> tokenizer -> token shards -> a class-conditional NBP model "
             "(one latent row per step) and an NTP model (one token per step), trained alike "
             "-> clips generated per class -> this report.", ""]
    for section in (stage_section(stages, total), data_section(scale, results),
                    training_section(scale, results), stats_section(results),
                    temporal_section(results),
                    by_eye_section(scale), speed_section(results, stages),
                    files_section(results)):
        lines += section
    with open(path, "w") as f:
        f.write("\n".join(lines))
    return path
