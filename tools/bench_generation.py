"""Generation speed: next-block prediction (rows, frames) against next-token prediction, side by
side, with the time split into the model's forward, the sampler and the rest.

    python tools/bench_generation.py --json [CONFIG] [--set key=value ...] [--size cpu]
        [--batches 1 8] [--setups rows frames ntp] [--rounds 2] [--given-frames 2]
        [--threads N] [--device cpu|cuda] [--dtype fp32|bf16] [--cuda-graph]
        [--tokenizer tiny|none|PATH] [--sampler-repeats 3] [--sampler-only]

Setups: one model per block shape, identical but for model.block_shape and built from the same
seed (the same weights and weight layout): rows 1x1xW (NBP's default, one token row per step),
frames 1xHxW (one latent frame per step) and ntp 1x1x1 (next-token prediction), all generating
through nbp_mega.generate (KV cache, one forward per block). CONFIG (default
configs/nbp_700m.yaml: the paper's K600 layout, 5x16x16 grid, vocabulary 64000, no start block)
sets the layout; --size picks the model: a row of the size table (700m, ...) or "cpu", the CPU
default of 8 layers, d=512, 8 heads (25M parameters in the layers, 33M in the head over 64000
ids): a size at which a step is the model's time (measured: the engine's own Python is
< 1% of a step, NTP's one-token forward ~55 ms), and the run still fits in ~10 minutes on 2
cores (NTP's 768 steps per clip at batch 8 are half of it). Each clip gets
the first --given-frames latent frames (random ids) and generates the rest, as the paper
measures K600 (2 latent frames = 5 video frames given, 12 generated; NBP_FACTS.md section 2).
Sampling: the paper's top-k 16000, top-p 0.9, temperature 1.

Timing: after a warm-up clip per (setup, batch) (on the CPU one that generates the last latent
frame only), --rounds rounds time every (setup, batch) once each, in order in even rounds and
in reverse order in odd ones (ABBA), so drifting load hits all alike. A round's generate call
is timed whole ("seconds": for the batch); inside it, model.hidden_states + model.logits (the
forward; with --cuda-graph the graph replays) and nbp_mega.generate.engine.sample (the sampler)
are timed by wrapping them (CUDA: synchronised); then the tokenizer decodes the batch's clips
(--tokenizer; default "tiny": the tiny preset with random weights, a [B, 5, 16, 16] grid to
[B, 3, 17, 128, 128] pixels), timed apart. The load of the machine (nbp_mega/machine_load.py)
is recorded throughout: README figures only from a run whose machine record says "quiet".

--cuda-graph (CUDA): the steps replay CUDA graphs (generate(cuda_graph=True): GraphedSteps,
captured in the warm-up clip); records are then "variant": "cuda_graph" and eager ones are
timed too, in the same rounds. If capturing fails, the graph records carry the error.

--json prints one JSON list, records told apart by "shape":
    {"shape": "machine", device, cpu, threads, torch, dtype, model {layers, hidden, heads,
     parameters}, config, overrides, grid, vocab, given_frames, tokenizer, attention,
     rounds, order, load, quiet}                                                     (first)
    {"shape": "sampler", batch, positions, vocab, top_k, top_p, kernel (what generate runs:
     cpu_kernel = nbp_mega._C's sample_rows, or torch), seconds (median per call),
     torch_seconds (the PyTorch-ops path), former_seconds (the first sampler: full sort of
     V), speedup (former / seconds), speedup_over_torch, repeats}               (per batch)
    {"shape": "rows" | "frames" | "ntp", variant, block_shape, block_len, batch, steps
     (forwards per clip), tokens (generated, whole batch), generated_frames (video frames per
     clip), seconds (median over rounds, whole batch), seconds_by_round, tokens_per_s,
     video_frames_per_s, decode_seconds, video_frames_per_s_with_decode, forward_seconds,
     sampler_seconds, sampler_overhead (1 - forward / seconds: the step time outside the
     model's forward), sampler_fraction (sampler / seconds), step_seconds, error (only if it
     failed)}                                                     (per setup, batch, variant)
    {"shape": "ratios", batch, variant, rows_over_ntp, frames_over_ntp (video frames/s ratios
     of this run's records), the same with decode, steps_ratio}            (per batch, variant)
    {"shape": "paper", variant, batch, rows and ntp video frames/s next to the paper's 8.89 and
     0.80 (700M on one A100)}                                              (per batch, variant)
    {"shape": "targets", all_met, targets: [{target, batch, setup, variant, value, limit,
     met}]}: on the CPU, NBP rows >= 11x NTP in video frames/s and sampler_overhead <= 0.10;
     met is null where a value is missing, and every target is null on other devices
    {"shape": "roofline", gemm_flops_per_s, gemm_n, read_bytes_per_s, matmul_weights,
     weight_bytes, flops_per_token, floors: [{batch, rows_seconds, ntp_seconds,
     rows_over_ntp, ntp_measured_seconds, rows_over_ntp_ceiling}]}: the fastest clips this
     device allows (see roofline()); the ceiling (add_ceilings) is this run's NTP seconds
     over the rows floor, the most rows / NTP can reach here, also written beside the ratio
     targets as "ceiling" and "reachable"                                           (last)
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import os
import platform
import statistics
import sys
import time
from dataclasses import replace

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from nbp_mega.config import load_config  # noqa: E402
from nbp_mega.generate import (  # noqa: E402
    SamplingConfig,
    engine,
    generate,
    sampling,
)
from nbp_mega.machine_load import LoadWatch  # noqa: E402
from nbp_mega.model import NBPTransformer  # noqa: E402
from nbp_mega.ops import attention_impl, use_attention_impl  # noqa: E402
from nbp_mega.parallel.layers import TensorParallel  # noqa: E402

SIZES = {"cpu": ["model.size=tiny", "model.layers=8", "model.hidden=512", "model.heads=8"]}
TARGET_RATIO, TARGET_OVERHEAD = 11.0, 0.10  # the CPU targets
PAPER_A100 = {"rows": 8.89, "ntp": 0.80}  # video frames/s, 700M, one A100 (NBP_FACTS.md 2)
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def block_shape(setup: str, grid: list[int]) -> list[int]:
    return {"rows": [1, 1, grid[2]], "frames": [1, grid[1], grid[2]], "ntp": [1, 1, 1]}[setup]


def video_frames(latent: int, ft: int) -> int:
    """Video frames of `latent` latent frames (the first latent frame is one video frame)."""
    return 1 + ft * (latent - 1) if latent else 0


# -- timing inside generate ------------------------------------------------------------------
class Clock:
    """Seconds spent in wrapped calls, by kind; nested wrapped calls count once (outermost)."""

    def __init__(self, device: torch.device, watch: LoadWatch):
        self.sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
        self.watch, self.seconds, self.calls, self._depth = watch, {}, {}, 0

    def reset(self) -> None:
        self.seconds, self.calls = {"forward": 0.0, "sampler": 0.0}, {"sampler": 0}

    def wrap(self, kind: str, fn):
        @functools.wraps(fn)
        def timed(*args, **kwargs):
            if self._depth:
                return fn(*args, **kwargs)
            self._depth += 1
            self.sync()
            start = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self.sync()
                self.seconds[kind] += time.perf_counter() - start
                self.calls[kind] = self.calls.get(kind, 0) + 1
                self._depth -= 1
                self.watch.tick()
        return timed

    @contextlib.contextmanager
    def attached(self, model):
        """Time model.hidden_states + model.logits (forward) and the engine's sampler."""
        from nbp_mega.generate.cuda_graph import GraphedSteps

        patched = [(model, "hidden_states"), (model, "logits"), (engine, "sample"),
                   (GraphedSteps, "__call__"), (GraphedSteps, "logits")]
        saved = [(obj, name, obj.__dict__.get(name)) for obj, name in patched]
        for obj, name in patched:
            kind = "sampler" if obj is engine else "forward"
            setattr(obj, name, self.wrap(kind, getattr(obj, name)))
        try:
            yield self
        finally:
            for obj, name, old in saved:
                if old is None:
                    delattr(obj, name)  # back to the class's method
                else:
                    setattr(obj, name, old)


# -- the sampler alone: before and after -----------------------------------------------------
def former_sample(logits, cfg, generators):
    """The sampler as it was before (commit 359eafc): filter over V (top-k mask, full sort for
    top-p, scatter back), softmax and cumsum over V, searchsorted."""
    logits = logits.float() / cfg.temperature
    kth = logits.topk(min(cfg.top_k, logits.shape[-1]), dim=-1).values[..., -1:]
    logits = logits.masked_fill(logits < kth, float("-inf"))
    sorted_logits, order = logits.sort(dim=-1, descending=True)
    probs = sorted_logits.softmax(dim=-1)
    drop = probs.cumsum(dim=-1) - probs >= cfg.top_p
    logits = logits.scatter(-1, order, sorted_logits.masked_fill(drop, float("-inf")))
    probs = logits.softmax(dim=-1)
    uniform = torch.stack([torch.rand(logits.shape[1], generator=g) for g in generators])
    cdf = probs.cumsum(dim=-1)
    ids = torch.searchsorted(cdf, (uniform.to(cdf.device) * cdf[..., -1]).unsqueeze(-1)
                             .contiguous(), right=True)
    return ids.squeeze(-1).clamp_(max=logits.shape[-1] - 1)


def torch_sample(logits, cfg, generators):
    """The sampler in PyTorch ops (what other devices run; the CPU's before sample_rows)."""
    uniform = sampling._uniforms(generators, logits.shape[1], logits.device)
    return sampling.draw(logits, cfg, uniform, kernel="torch")


def bench_sampler(batches, vocab: int, positions: int, repeats: int, device, clock) -> list:
    """Median seconds per call of the sampler generate runs (on the CPU the C++ kernel), of
    its PyTorch-ops path and of the former one (full sort), calls rotating."""
    cfg, records = SamplingConfig(), []
    fns = {"sampler": sampling.sample, "torch": torch_sample, "former": former_sample}
    for batch in batches:
        logits = torch.randn(batch, positions, vocab, device=device) * 0.5
        gens = [torch.Generator().manual_seed(s) for s in range(batch)]
        times = {name: [] for name in fns}
        for r in range(repeats + 1):  # the first of each is a warm-up
            names = list(fns)
            for name in names[r % len(names):] + names[:r % len(names)]:
                clock.sync()
                start = time.perf_counter()
                fns[name](logits, cfg, gens)
                clock.sync()
                if r:
                    times[name].append(time.perf_counter() - start)
                clock.watch.sample(f"sampler {name} batch {batch}")
        new, torch_ops, old = (statistics.median(times[n]) for n in fns)
        records.append({"shape": "sampler", "batch": batch, "positions": positions,
                        "vocab": vocab, "top_k": cfg.top_k, "top_p": cfg.top_p,
                        "kernel": sampling.default_kernel(device), "seconds": sig(new),
                        "torch_seconds": sig(torch_ops),
                        "former_seconds": sig(old), "speedup": round(old / new, 2),
                        "speedup_over_torch": round(torch_ops / new, 2), "repeats": repeats})
    return records


# -- the setups ------------------------------------------------------------------------------
def build_model(cfg, dims, shape: list[int], device, dtype) -> NBPTransformer:
    model_cfg = replace(cfg.model, block_shape=list(shape), dropout=0.0)
    torch.manual_seed(cfg.seed)  # the same weights for every setup
    model = NBPTransformer(model_cfg, TensorParallel(dims, init_std=model_cfg.init_std))
    return model.to(device=device, dtype=dtype).eval()


def run_clip(model, batch: int, seed: int, given: int, cuda_graph: bool) -> torch.Tensor:
    """One batch of clips, the first `given` latent frames given (random ids)."""
    g = torch.Generator().manual_seed(seed)
    _, H, W = model.cfg.grid
    context = torch.randint(0, model.cfg.vocab_size, (batch, given, H, W), generator=g)
    return generate(model, seeds=list(range(seed, seed + batch)), context=context,
                    sampling=SamplingConfig(), cuda_graph=cuda_graph)


class Setup:
    """One (block shape, batch, variant): its model, and what its timed rounds measured."""

    def __init__(self, name: str, model, batch: int, variant: str):
        self.name, self.model, self.batch, self.variant = name, model, batch, variant
        self.rounds: list[dict] = []
        self.error: str | None = None

    @property
    def label(self) -> str:
        return f"{self.name} b{self.batch} {self.variant}"

    def clip(self, seed: int, given: int, clock: Clock, tokenizer) -> dict:
        clock.reset()
        with clock.attached(self.model):
            clock.sync()
            start = time.perf_counter()
            tokens = run_clip(self.model, self.batch, seed, given,
                              cuda_graph=self.variant == "cuda_graph")
            clock.sync()
            seconds = time.perf_counter() - start
        decode = None
        if tokenizer is not None:
            start = time.perf_counter()
            tokenizer.decode(tokens)  # to pixels on the CPU
            decode = time.perf_counter() - start
        return {"seconds": seconds, "decode_seconds": decode, "steps": clock.calls["sampler"],
                **{f"{k}_seconds": v for k, v in clock.seconds.items()}}


def summarise(s: Setup, given: int, ft: int) -> dict:
    model, grid = s.model, s.model.cfg.grid
    out = {"shape": s.name, "variant": s.variant, "block_shape": list(model.cfg.block_shape),
           "block_len": model.layout.block_len, "batch": s.batch}
    if s.error or not s.rounds:
        return {**out, "error": s.error or "not measured", "seconds": None}
    median = {k: statistics.median(r[k] for r in s.rounds)
              for k in ("seconds", "forward_seconds", "sampler_seconds")}
    seconds = median["seconds"]
    tokens = s.batch * (grid[0] - given) * grid[1] * grid[2]
    frames = video_frames(grid[0], ft) - video_frames(given, ft)
    decode = (statistics.median(r["decode_seconds"] for r in s.rounds)
              if s.rounds[0]["decode_seconds"] is not None else None)
    steps = s.rounds[0]["steps"]
    return {**out, "steps": steps, "tokens": tokens, "generated_frames": frames,
            "seconds": sig(seconds),
            "seconds_by_round": [sig(r["seconds"]) for r in s.rounds],
            "tokens_per_s": sig(tokens / seconds),
            "video_frames_per_s": sig(s.batch * frames / seconds),
            "decode_seconds": None if decode is None else sig(decode),
            "video_frames_per_s_with_decode":
                None if decode is None else sig(s.batch * frames / (seconds + decode)),
            "forward_seconds": sig(median["forward_seconds"]),
            "sampler_seconds": sig(median["sampler_seconds"]),
            "sampler_overhead": sig(1 - median["forward_seconds"] / seconds),
            "sampler_fraction": sig(median["sampler_seconds"] / seconds),
            "step_seconds": sig(seconds / steps), "rounds": len(s.rounds)}


def sig(x: float, digits: int = 6) -> float:
    """`x` to `digits` significant figures: a fixed number of decimals loses a fast clip's time."""
    return float(f"{x:.{digits}g}")


def ratio(a, b):
    return None if a is None or b is None else round(a / b, 2)


FPS, FPS_DECODE = "video_frames_per_s", "video_frames_per_s_with_decode"


def comparisons(rows: list[dict], device: str) -> list[dict]:
    """ratios and paper records per (batch, variant), then the targets, all from `rows`."""
    by = {(r["shape"], r["batch"], r["variant"]): r for r in rows}
    out, targets = [], []
    for batch, variant in sorted({(r["batch"], r["variant"]) for r in rows}):
        def get(name, key, batch=batch, variant=variant):
            return (by.get((name, batch, variant)) or {}).get(key)

        key = {"batch": batch, "variant": variant}
        out.append({"shape": "ratios", **key,
                    "rows_over_ntp": ratio(get("rows", FPS), get("ntp", FPS)),
                    "frames_over_ntp": ratio(get("frames", FPS), get("ntp", FPS)),
                    "rows_over_ntp_with_decode": ratio(get("rows", FPS_DECODE),
                                                       get("ntp", FPS_DECODE)),
                    "frames_over_ntp_with_decode": ratio(get("frames", FPS_DECODE),
                                                         get("ntp", FPS_DECODE)),
                    "steps_ratio": ratio(get("ntp", "steps"), get("rows", "steps"))})
        out.append({"shape": "paper", **key, "rows_video_frames_per_s": get("rows", FPS),
                    "ntp_video_frames_per_s": get("ntp", FPS), "paper_a100_700m": PAPER_A100})
        targets.append(_target("rows_over_ntp_video_frames_per_s", key, "rows",
                               out[-2]["rows_over_ntp"], TARGET_RATIO, device))
        targets += [_target("sampler_overhead", key, name, get(name, "sampler_overhead"),
                            TARGET_OVERHEAD, device)
                    for name in ("rows", "frames", "ntp") if (name, batch, variant) in by]
    met = [t["met"] for t in targets if t["met"] is not None]
    out.append({"shape": "targets", "all_met": all(met) if met else None, "targets": targets})
    return out


def _target(name: str, key: dict, setup: str, value, limit: float, device: str) -> dict:
    """A target of the CPU (met: null elsewhere, or without a value): a ratio must reach its
    limit, an overhead stay within it."""
    at_least = name.startswith("rows_over")
    met = None
    if value is not None and device == "cpu":
        met = value >= limit if at_least else value <= limit
    return {"target": name, **key, "setup": setup, "value": value,
            "limit": f"{'>=' if at_least else '<='} {limit}", "met": met}


def markdown(records: list[dict]) -> str:
    """The setups and the paper comparison as tables (what gpu_check.sh logs)."""
    machine = records[0]
    lines = [f"{machine.get('gpu', machine['cpu'])}, {machine['threads']} threads, torch "
             f"{machine['torch']}, {machine['dtype']}, model {machine['model']}, quiet: "
             f"{machine['quiet']}", "",
             "| setup | variant | batch | steps | seconds | video frames/s | with decode | "
             "outside forward | sampler |", "|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in (r for r in records if r["shape"] in ("rows", "frames", "ntp")):
        if r.get("error"):
            lines.append(f"| {r['shape']} | {r['variant']} | {r['batch']} | SKIPPED: "
                         f"{r['error'][:160]} |||||")
            continue
        lines.append(f"| {r['shape']} | {r['variant']} | {r['batch']} | {r['steps']} | "
                     f"{r['seconds']:.3f} | {r['video_frames_per_s']} | "
                     f"{r['video_frames_per_s_with_decode']} | {r['sampler_overhead']:.1%} | "
                     f"{r['sampler_fraction']:.1%} |")
    lines += ["", "| variant | batch | NBP rows frames/s | NTP frames/s | paper (A100, 700M) |",
              "|---|---:|---:|---:|---|"]
    lines += [f"| {r['variant']} | {r['batch']} | {r['rows_video_frames_per_s']} | "
              f"{r['ntp_video_frames_per_s']} | 8.89 / 0.80 |"
              for r in records if r["shape"] == "paper"]
    for r in (r for r in records if r["shape"] == "roofline"):
        floors = ", ".join(f"batch {f['batch']} {f['rows_over_ntp']}x" for f in r["floors"])
        lines += ["", f"roofline: GEMM {r['gemm_flops_per_s'] / 1e9:.0f} GFLOP/s, read "
                  f"{r['read_bytes_per_s'] / 1e9:.0f} GB/s; the most rows / NTP can be: {floors}"]
    return "\n".join(lines)


# -- the run ---------------------------------------------------------------------------------
def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("config", nargs="?", default=os.path.join(ROOT, "configs/nbp_700m.yaml"))
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE",
                        help="config overrides after --size's, e.g. model.layers=2")
    parser.add_argument("--size", default=None, help="cpu (default on the CPU) or a row of the "
                        "size table (default on CUDA: the config's, 700m)")
    parser.add_argument("--setups", nargs="+", default=["rows", "frames", "ntp"],
                        choices=["rows", "frames", "ntp"])
    parser.add_argument("--batches", nargs="+", type=int, default=[1, 8])
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--given-frames", type=int, default=2)
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--dtype", default="fp32", choices=list(DTYPES))
    parser.add_argument("--cuda-graph", action="store_true",
                        help="also time the steps replayed from CUDA graphs (CUDA only)")
    parser.add_argument("--attention", default=None, help="attention implementation (default: "
                        "the dispatcher's on the CPU, block_loop on CUDA, as in the graphs)")
    parser.add_argument("--tokenizer", default="tiny", help="tokenizer preset or file for "
                        "decoding; 'none' skips decoding")
    parser.add_argument("--sampler-repeats", type=int, default=3, help="0 skips the sampler "
                        "record")
    parser.add_argument("--sampler-only", action="store_true", help="only the sampler records")
    parser.add_argument("--json", action="store_true", help="print the JSON list (else tables)")
    args = parser.parse_args(argv)
    if args.cuda_graph and args.device != "cuda":
        parser.error("--cuda-graph needs --device cuda")
    return args


def load_tokenizer(name: str, device, batch: int, vocab: int):
    if name == "none":
        return None
    from nbp_mega.tokenizer import load_video_tokenizer

    tokenizer = load_video_tokenizer(name, device=device, batch_size=batch)
    if tokenizer.codebook_size < vocab:
        raise SystemExit(f"--tokenizer {name}: codebook of {tokenizer.codebook_size} codes, "
                         f"the model's vocabulary has {vocab}; use a tokenizer with at least "
                         "as many codes, or --tokenizer none")
    return tokenizer


def run(args, cfg, dims, watch: LoadWatch) -> tuple[list[dict], int]:
    device, dtype = torch.device(args.device), DTYPES[args.dtype]
    clock = Clock(device, watch)
    records = []
    if args.sampler_repeats:
        records += bench_sampler(args.batches, cfg.model.vocab_size, cfg.model.grid[2],
                                 args.sampler_repeats, device, clock)
    if args.sampler_only:
        return records, 0
    tokenizer = load_tokenizer(args.tokenizer, device, max(args.batches), cfg.model.vocab_size)
    ft = tokenizer.downsample[0] if tokenizer is not None else 4
    models = {name: build_model(cfg, dims, block_shape(name, cfg.model.grid), device, dtype)
              for name in args.setups}
    variants = ["eager", "cuda_graph"] if args.cuda_graph else ["eager"]
    setups = [Setup(name, models[name], batch, variant) for variant in variants
              for batch in args.batches for name in args.setups]
    T = cfg.model.grid[0]
    for s in setups:  # warm-up (and graph capture): the CPU generates the last frame only
        given = args.given_frames if device.type == "cuda" else T - 1
        try:
            s.clip(10_000, given, clock, tokenizer)
        except Exception as e:  # noqa: BLE001 (a failing variant is recorded, the rest goes on)
            s.error = f"{type(e).__name__}: {e}"
        watch.sample(f"warm-up {s.label}")
    for r in range(args.rounds):
        for s in setups if r % 2 == 0 else setups[::-1]:
            if s.error:
                continue
            try:
                s.rounds.append(s.clip(1 + r * max(args.batches), args.given_frames, clock,
                                       tokenizer))
            except Exception as e:  # noqa: BLE001
                s.error = f"{type(e).__name__}: {e}"
            watch.sample(f"round {r} {s.label}")
    rows = [summarise(s, args.given_frames, ft) for s in setups]
    model = models[args.setups[0]]
    params = sum(p.numel() for p in model.parameters())
    floor = roofline(model, device, dtype, args.batches, args.given_frames)
    watch.sample("roofline")
    compared = comparisons(rows, device.type)
    add_ceilings(floor, rows, next(r for r in compared if r["shape"] == "targets"))
    return records + rows + compared + [floor], params


def add_ceilings(floor: dict, rows: list[dict], targets: dict) -> None:
    """The most rows / NTP can reach against this run's own NTP clips: a rows clip cannot beat
    its floor (all its tokens' matmul FLOPs at the measured GEMM rate), so measured NTP seconds
    over that floor bounds the ratio from above, whatever the rows engine does. Written into
    the roofline's floors and beside each eager ratio target ("reachable": the ceiling reaches
    the limit; false: the target needs NTP slower than measured, or a faster machine)."""
    ntp = {r["batch"]: r.get("seconds") for r in rows
           if r["shape"] == "ntp" and r["variant"] == "eager"}
    ceiling = {}
    for f in floor["floors"]:
        if ntp.get(f["batch"]):
            f["ntp_measured_seconds"] = ntp[f["batch"]]
            ceiling[f["batch"]] = f["rows_over_ntp_ceiling"] = round(
                ntp[f["batch"]] / f["rows_seconds"], 2)
    for t in targets["targets"]:
        if t["target"].startswith("rows_over") and t["variant"] == "eager" \
                and t["batch"] in ceiling:
            t["ceiling"] = ceiling[t["batch"]]
            t["reachable"] = ceiling[t["batch"]] >= TARGET_RATIO


# -- the roofline ----------------------------------------------------------------------------
def roofline(model, device, dtype, batches, given: int) -> dict:
    """The fastest a clip could go on this device: measured matmul rate and weight-read rate,
    the model's matmul weights (all 2-D parameters but the embedding tables: what every token
    multiplies and every step reads), and per batch the floor of a rows clip (all its tokens'
    matmul FLOPs at the GEMM rate) and an NTP clip (per step the larger of reading the weights
    and its batch's FLOPs), their ratio the most rows / NTP can be here. Attention, the
    sampler and everything else only add to both."""
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)

    def seconds(fn, repeats=5):
        fn()
        sync()
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            fn()
            sync()
            times.append(time.perf_counter() - start)
        return statistics.median(times)

    n = 4096 if device.type == "cuda" else 1024
    a, b = (torch.randn(n, n, device=device, dtype=dtype) for _ in range(2))
    gemm = 2 * n ** 3 / seconds(lambda: a @ b)
    big = torch.randn(64 * 2 ** 20, device=device, dtype=dtype)  # 256 MB at fp32
    read = big.numel() * big.element_size() / seconds(lambda: big.sum())
    weights = sum(p.numel() for name, p in model.named_parameters()
                  if p.dim() == 2 and not name.startswith(("tok_emb", "pos_emb")))
    weight_bytes = weights * torch.finfo(dtype).bits // 8
    T, H, W = model.cfg.grid
    tokens = (T - given) * H * W
    floors = []
    for batch in batches:
        rows = batch * tokens * 2 * weights / gemm
        ntp = tokens * max(weight_bytes / read, batch * 2 * weights / gemm)
        floors.append({"batch": batch, "rows_seconds": sig(rows), "ntp_seconds": sig(ntp),
                       "rows_over_ntp": round(ntp / rows, 2)})
    return {"shape": "roofline", "gemm_flops_per_s": sig(gemm), "gemm_n": n,
            "read_bytes_per_s": sig(read), "matmul_weights": weights,
            "weight_bytes": weight_bytes, "flops_per_token": 2 * weights, "floors": floors}


def machine_record(args, cfg, load: dict, params: int) -> dict:
    m = cfg.model
    record = {"shape": "machine", "device": args.device,
              "cpu": platform.processor() or platform.machine(), "threads": args.threads,
              "torch": torch.__version__, "dtype": args.dtype,
              "model": {"family": m.family, "layers": m.layers, "hidden": m.hidden,
                        "heads": m.heads, "parameters": params},
              "config": os.path.relpath(args.config, ROOT), "overrides": args.set,
              "size": args.size, "grid": list(m.grid), "vocab": m.vocab_size,
              "given_frames": args.given_frames, "tokenizer": args.tokenizer,
              "attention": attention_impl(), "rounds": args.rounds,
              "order": "ABBA: setups in order in even rounds, reversed in odd ones",
              "load": load, "quiet": load["quiet"]}
    if args.device == "cuda":
        record["gpu"] = torch.cuda.get_device_name()
    return record


def main(argv=None) -> int:
    from nbp_mega.parallel.dims import ParallelConfig, init_parallel, shutdown_parallel

    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    size = args.size or ("cpu" if args.device == "cpu" else None)
    overrides = SIZES.get(size, [] if size is None else [f"model.size={size}", "model.layers=0",
                                                         "model.hidden=0", "model.heads=0"])
    cfg = load_config(args.config, overrides + args.set)
    args.size = size
    dims = init_parallel(ParallelConfig(tensor=1))
    watch = LoadWatch()
    attention = args.attention or ("block_loop" if args.device == "cuda" else attention_impl())
    with use_attention_impl(attention):
        records, params = run(args, cfg, dims, watch)
        machine = machine_record(args, cfg, watch.summary(), params)
    out = [machine, *records]
    print(json.dumps(out, indent=1) if args.json else markdown(out))
    shutdown_parallel()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
