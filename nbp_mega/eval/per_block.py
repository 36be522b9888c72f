"""Validation loss and accuracy by position: per block, per latent frame, per latent row.

    scores = position_scores(model, val_index, batch_size=8, max_batches=4, dims=dims)
    scores["frame"]["loss"]   # [T] mean loss of the tokens of each latent frame

The paper's Fig. 6 view: how the loss falls along the clip, which shows what a block sees.
A block is the model's own unit (a row for NBP rows, one token for NTP), so `block` is not
comparable across models; latent frames and latent rows (t, h) are, whatever the block shape.
Accuracy is top-1 (the argmax of the full-vocabulary logits is the target).

Legend: B clips, Nt target tokens, V vocabulary, T/H/W latent grid, L block length.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from nbp_mega.parallel.collectives import all_reduce_, gather_last_dim, tensor_parallel_group

VIEWS = ("block", "frame", "row")


def target_groups(layout, grid) -> dict[str, torch.Tensor]:
    """view -> [Nt] the group of each target token: its block in the clip, its latent frame
    t, its latent row t * H + h."""
    _, H, _ = grid
    video = torch.arange(layout.num_targets) + layout.target_offset  # video index of target j
    coords = layout.blocks.coords[video]  # [Nt, 3] (t, h, w)
    return {"block": video // layout.block_len, "frame": coords[:, 0].long(),
            "row": (coords[:, 0] * H + coords[:, 1]).long()}


@torch.no_grad()
def token_scores(model, input_ids: torch.Tensor, targets: torch.Tensor,
                 chunk: int = 512) -> tuple[torch.Tensor, torch.Tensor]:
    """(loss [B, Nt] nats, correct [B, Nt] bool) from full-vocabulary logits, `chunk` target
    positions at a time (the logits [B, chunk, V] of one chunk exist at once)."""
    model.eval()
    P, Nt = model.layout.prefix_len, targets.shape[1]
    h = model.hidden_states(input_ids)[:, P : P + Nt]
    group = tensor_parallel_group(model)
    losses, correct = [], []
    for lo in range(0, Nt, chunk):
        logits = gather_last_dim(model.logits(h[:, lo : lo + chunk]), group)  # [B, c, Vp]
        t = targets[:, lo : lo + chunk]
        losses.append(F.cross_entropy(logits.transpose(1, 2), t, reduction="none"))
        correct.append(logits.argmax(dim=-1) == t)
    return torch.cat(losses, dim=1), torch.cat(correct, dim=1)


@torch.no_grad()
def position_scores(model, val_index, *, batch_size: int, max_batches: int, dims) -> dict:
    """{view: {"loss": [...], "accuracy": [...]}, "clips": n, "loss": mean, "accuracy": mean}
    over the first max_batches batches of the validation shards, split over dims' DP ranks.
    A group without targets (the given first block of a model without a start block) is None."""
    from nbp_mega.data.loader import TextSpec, eval_batches

    layout, cfg = model.layout, model.cfg
    groups = target_groups(layout, cfg.grid)
    sizes = {v: int(g.max()) + 1 for v, g in groups.items()}
    # [loss sum, correct sum] per group of each view, then the clip count: one all-reduce
    sums = {v: torch.zeros(2, n, dtype=torch.float64) for v, n in sizes.items()}
    clips = torch.zeros(1, dtype=torch.float64)
    device = next(model.parameters()).device
    for batch in eval_batches(val_index, batch_size=batch_size, dp_rank=dims.dp_rank,
                              dp_size=dims.dp, max_batches=max_batches, grid=tuple(cfg.grid),
                              vocab_size=cfg.vocab_size, text=TextSpec.from_model(cfg)):
        tokens = batch.tokens.to(device)
        if layout.text_len:
            ids, targets = layout.build(tokens, text=batch.text.to(device))
        else:
            ids, targets = layout.build(tokens, batch.labels.to(device) if layout.prefix_len
                                        else None)
        loss, correct = token_scores(model, ids, targets, chunk=cfg.loss_chunk or 512)
        per_target = torch.stack([loss.sum(0), correct.sum(0)]).double().cpu()  # [2, Nt]
        for v, g in groups.items():
            sums[v].index_add_(1, g, per_target)
        clips += loss.shape[0]
    flat = all_reduce_(torch.cat([*(s.reshape(-1) for s in sums.values()), clips]),
                       dims.dp_group)
    n = float(flat[-1])
    out: dict = {"clips": int(n)}
    offset = 0
    for v, g in groups.items():
        k = sizes[v]
        s = flat[offset : offset + 2 * k].view(2, k)
        offset += 2 * k
        tokens = torch.bincount(g, minlength=k).double() * n
        counts = tokens.tolist()
        out[v] = {key: [x / c if c else None for x, c in zip(row.tolist(), counts, strict=True)]
                  for key, row in (("loss", s[0]), ("accuracy", s[1]))}  # None: no target
    total_tokens = n * len(groups["block"])
    s = flat[: 2 * sizes["block"]].view(2, -1).sum(dim=1)
    out["loss"], out["accuracy"] = float(s[0] / total_tokens), float(s[1] / total_tokens)
    return out


def plot_position_scores(scores: dict[str, dict], grid, path: str) -> None:
    """PNG: loss and accuracy per latent row (dotted lines: the next latent frame) for each
    model of `scores` {name: position_scores(...)}."""
    from nbp_mega.eval.plots import pyplot, save

    fig, axes = pyplot().subplots(1, 2, figsize=(11, 4))
    for name, s in scores.items():
        for ax, key in zip(axes, ("loss", "accuracy"), strict=True):
            values = np.array([np.nan if x is None else x for x in s["row"][key]])
            ax.plot(np.arange(len(values)), values, "o-", ms=3, label=name)
    for ax, what in zip(axes, ("validation loss (nats per token)", "top-1 accuracy"),
                        strict=True):
        for t in range(1, grid[0]):
            ax.axvline(t * grid[1] - 0.5, color="grey", lw=0.8, ls=":")
        ax.set(xlabel=f"latent row t*{grid[1]} + h of the predicted tokens", ylabel=what)
    fig.suptitle("Validation scores per latent row (dotted: the next latent frame)")
    save(fig, path, legends=axes)
