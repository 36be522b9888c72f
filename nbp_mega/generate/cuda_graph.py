"""Generation steps replayed from CUDA graphs: one graph per step of a clip, captured lazily.

Legend: B batch (the cache's rows); S the step's input length; n positions whose logits are
wanted (the block predicted next); d width; V vocabulary (padded, fp32 logits).

A step `model.hidden_states(ids, start, cache)` is a fixed sequence of kernels for a given
(start, S): its positions are Python ints (position table slice, rotary slice, the attention's
q_offset, the KV cache window [start, start + S)), baked into the kernels' arguments when the
step is captured. So each distinct start of a clip gets its own torch.cuda.CUDAGraph, captured
the first time that step runs and replayed afterwards (generate calls with the same batch reuse
them, as the cache and the buffers stay where they are). Replaying a graph costs one launch
instead of the hundreds of Python-issued kernels of a step, which is what bounds small-batch
generation on a GPU.

What a graph reads and writes has fixed addresses: the ids are copied into a static input
buffer before each replay; the KV cache (`StaticKVCache`, written in place) belongs to the
caller and must outlive this object; outputs land in static output buffers, one per output
shape, shared by the steps of that shape and overwritten by the next replay (copy them to keep
them). Every graph allocates its temporaries from one shared memory pool: safe because replays
never overlap (one stream, one step at a time) and no temporary outlives its replay.

Attention inside the graphs runs `attention` (default "block_loop": SDPA over each block's
visible keys, its few masks allocated inside the graph). Not FlexAttention, the eager default on
CUDA: its block masks live in an LRU cache of 64 entries outside the graphs, so a clip of more
steps would free masks that earlier graphs still read ("fused", our CUDA kernel, needs no mask
tensors and is fine too).

Capture follows PyTorch's recipe (docs: "CUDA Graphs"): warm-up runs on a side stream first
(lazy initialisation, cuBLAS workspaces, FlexAttention's block masks and compiled kernels all
happen outside the capture), then capture under torch.no_grad. The warm-up executes the step
for real: it writes the step's keys and values into the cache window [start, start + S), which
the replay rewrites with the same values (a step reads only positions before its window's end,
written by itself or by earlier steps), so capturing changes no result.
"""

from __future__ import annotations

import torch

from nbp_mega.generate.kv_cache import StaticKVCache
from nbp_mega.ops import use_attention_impl

WARMUP_RUNS = 2  # eager runs of a step on a side stream before its capture


def _cuda_device(model) -> torch.device:
    device = next(model.parameters()).device
    if device.type != "cuda":
        raise ValueError(f"CUDA graphs (GraphedSteps, generate(cuda_graph=True)): the model's "
                         f"parameters are on {device}; move the model to a CUDA device, or "
                         "generate without CUDA graphs (eagerly)")
    return device


class GraphedSteps:
    """`steps(ids, start)` = model.hidden_states(ids, start, cache) and `steps.logits(ids,
    start, n)` = model.logits(hidden states[:, -n:]), each replayed from a CUDA graph per
    (start, S[, n]), captured on first use. ids [B, S] (any device; copied in)."""

    def __init__(self, model, cache, batch: int, *, attention: str = "block_loop"):
        device = _cuda_device(model)
        if cache.k.device != device or cache.k.shape[1] != batch:
            raise ValueError(f"GraphedSteps: the KV cache holds {cache.k.shape[1]} rows on "
                             f"{cache.k.device}; expected batch={batch} rows on {device}, the "
                             "model's device (StaticKVCache.for_model(model, batch))")
        self.model, self.cache, self.batch, self.device = model, cache, batch, device
        self.attention = attention
        self._graphs: dict[tuple, tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        self._inputs: dict[int, torch.Tensor] = {}  # S -> static ids [B, S]
        self._outputs: dict[tuple, torch.Tensor] = {}  # output shape -> static buffer
        self._pool = torch.cuda.graph_pool_handle()
        self._stream = torch.cuda.Stream(device)  # warm-up and capture

    @classmethod
    def for_model(cls, model, batch: int) -> GraphedSteps:
        """The model's graphed steps for `batch` rows, with their own KV cache: made on the
        first call, the same object (graphs already captured) on later ones. A cache left
        from an earlier clip is harmless: a step reads only keys its clip has written. Kept on
        the model (`model._graphed_steps`, {(batch, device): GraphedSteps}): they live and go
        with it."""
        device = _cuda_device(model)
        per_model = model.__dict__.setdefault("_graphed_steps", {})
        steps = per_model.get((batch, device))
        if steps is None:
            steps = cls(model, StaticKVCache.for_model(model, batch), batch)
            per_model[batch, device] = steps
        return steps

    @property
    def num_graphs(self) -> int:
        return len(self._graphs)

    def __call__(self, ids: torch.Tensor, start: int) -> torch.Tensor:
        """-> hidden states [B, S, d] (a static buffer: valid until the next call)."""
        return self._run(ids, start, None)

    def logits(self, ids: torch.Tensor, start: int, n: int) -> torch.Tensor:
        """-> fp32 logits [B, n, V] of the step's last n positions (static, as __call__)."""
        if not 0 < n <= ids.shape[1]:
            raise ValueError(f"GraphedSteps.logits: n={n} positions of a step of "
                             f"{ids.shape[1]}; expected 0 < n <= S")
        return self._run(ids, start, n)

    # -- capture and replay ---------------------------------------------------------------------
    def _run(self, ids: torch.Tensor, start: int, n: int | None) -> torch.Tensor:
        if ids.dim() != 2 or ids.shape[0] != self.batch:
            raise ValueError(f"GraphedSteps: ids of shape {list(ids.shape)}; expected "
                             f"[{self.batch}, S] (the batch these graphs were built for)")
        S = ids.shape[1]
        static = self._inputs.get(S)
        if static is None:
            static = self._inputs[S] = torch.zeros(self.batch, S, dtype=torch.long,
                                                   device=self.device)
        static.copy_(ids)
        key = (int(start), S, n)
        if key not in self._graphs:
            self._graphs[key] = self._capture(static, int(start), n)
        graph, out = self._graphs[key]
        graph.replay()
        return out

    @torch.no_grad()
    def _step(self, ids: torch.Tensor, start: int, n: int | None) -> torch.Tensor:
        h = self.model.hidden_states(ids, start, self.cache)  # [B, S, d]
        return h if n is None else self.model.logits(h[:, -n:])  # [B, n, V]

    @torch.no_grad()
    def _capture(self, ids: torch.Tensor, start: int, n: int | None):
        self.model.eval()  # no dropout: a graph replays fixed kernels
        stream = self._stream
        with use_attention_impl(self.attention):
            stream.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(stream):
                for _ in range(WARMUP_RUNS):
                    result = self._step(ids, start, n)
            torch.cuda.current_stream(self.device).wait_stream(stream)
            out = self._outputs.get((tuple(result.shape), result.dtype))
            if out is None:  # allocated outside the graphs' pool: it outlives every replay
                out = torch.empty_like(result)
                self._outputs[tuple(result.shape), result.dtype] = out
            del result
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=self._pool, stream=stream):
                out.copy_(self._step(ids, start, n))
        return graph, out
