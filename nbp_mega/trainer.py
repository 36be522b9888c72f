"""The training loop: step, evaluate, checkpoint, log.

Legend: GB global batch; b = GB / dp per rank; m micro batch; A = b / m accumulation steps;
S input length; Nt targets per clip; nb blocks; L block length.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass

import torch

from nbp_mega.cluster.slurm import REQUEUE_EXIT_CODE, Preempted, StopRequest, StopVote
from nbp_mega.config_fields import ConfigError, option
from nbp_mega.parallel.collectives import all_gather_objects, all_reduce_
from nbp_mega.profiling import StepProfiler, record_function

log = logging.getLogger("nbp_mega.trainer")


@dataclass
class TrainConfig:
    steps: int = option(1000, "optimizer steps in the whole run (sets the LR schedule)", min=1)
    global_batch: int = option(32, "clips per optimizer step, over all data-parallel ranks",
                               min=1)
    micro_batch: int = option(0, "clips per forward on one rank (0 = global_batch / dp, no "
                              "accumulation)", min=0)
    precision: str = option("fp32", "parameter/compute dtype", choices=["fp32", "bf16"])
    save_every: int = option(500, "checkpoint every N steps (0 = only at the end)", min=0)
    keep_last: int = option(3, "complete checkpoints to keep", min=1)
    eval_every: int = option(0, "validation loss every N steps (0 = only at the end)", min=0)
    eval_batches: int = option(4, "validation batches of global_batch clips", min=1)
    stop_at: int = option(0, "leave after this step with a checkpoint, as if preempted "
                          "(0 = run to train.steps)", min=0)
    max_minutes: float = option(0.0, "checkpoint and leave with exit code 75 ('requeue me', as "
                                "on SIGUSR1/SIGTERM) after the first step that ends this many "
                                "minutes after the process started; all ranks stop at the "
                                "same step (0 = no limit)", min=0.0)
    init_from: str = option("", "start a new run from these weights: a state-dict file "
                            "(tools/convert_to_hf.py --state-dict, tools/convert_from_nbp.py) or "
                            "a run / checkpoint folder of any ZeRO stage and TP size; the "
                            "model config must match. Ignored when run_dir has a checkpoint "
                            "to resume")

    def validate(self) -> None:
        if self.stop_at > self.steps:
            raise ConfigError(f"train.stop_at={self.stop_at} is after train.steps={self.steps}")


class Trainer:
    def __init__(self, cfg, *, dims, engine, layout, loader, val_index, checkpointer, metrics,
                 flops_per_token: float, peak_tflops: float):
        from nbp_mega.parallel.deepspeed import batch_arithmetic

        self.cfg, self.dims, self.engine, self.layout = cfg, dims, engine, layout
        self.loader, self.val_index = loader, val_index
        self.checkpointer, self.metrics = checkpointer, metrics
        self.flops_per_token, self.peak_tflops = flops_per_token, peak_tflops
        self.micro, self.accum = batch_arithmetic(cfg.train.global_batch,
                                                  cfg.train.micro_batch, dims.dp)
        self.step = 0
        self.stop = StopRequest(cfg.train.max_minutes)  # SIGUSR1, SIGTERM, train.max_minutes

    # -- state -------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        from nbp_mega.config import to_dict

        return {"step": self.step, "consumed_samples": self.step * self.cfg.train.global_batch,
                "data": self._data_state(), "config": to_dict(self.cfg),
                "layout": {"tp": self.dims.tp, "dp": self.dims.dp, "pp": self.dims.pp,
                           "zero_stage": self.cfg.parallel.zero_stage,
                           "precision": self.cfg.train.precision}}

    def _data_state(self) -> dict:
        """The position of every data stream: each data-parallel rank holds its own."""
        from nbp_mega.data.stream import merge_states

        return merge_states(all_gather_objects(self.loader.state_dict(), self.dims.dp_group))

    def load_state_dict(self, state: dict) -> None:
        self.step = state["step"]
        self.loader.load_state_dict(state["data"])

    # -- loop --------------------------------------------------------------------------------
    def train(self) -> None:
        """Steps up to train.stop_at or train.steps. Raises Preempted (exit code 75) after the
        checkpoint of the step at which the ranks agreed to stop early (StopRequest)."""
        cfg = self.cfg.train
        last = cfg.stop_at or cfg.steps
        profiler = self._profiler()
        with self.stop.handling_signals():
            while self.step < last:
                self._train_one(profiler)
                if cfg.eval_every and self.step % cfg.eval_every == 0:
                    self.evaluate()
                stop = self.stop.agreed()  # every step, on every rank: the same answer
                if stop or (cfg.save_every and self.step % cfg.save_every == 0) \
                        or self.step == last:
                    self.checkpointer.save(self.engine, self.step, self.state_dict())
                    stop = stop or self.stop.agreed()  # came during the save: it will do
                if stop and self.step < cfg.steps:
                    self._leave(stop)
            if self.step == cfg.steps and not (cfg.eval_every and
                                               cfg.steps % cfg.eval_every == 0):
                self.evaluate()

    def _train_one(self, profiler: StepProfiler) -> None:
        """The next step: a batch, train_step, the metrics line."""
        with profiler.step(self.step + 1):
            waited = time.perf_counter()
            with record_function("nbp.data"):
                batch = self.loader.next_batch()
            waited = time.perf_counter() - waited
            record, block_loss = self.train_step(batch)
        record["data_seconds"] = waited  # not in step_seconds: the loader prefetches
        self.step += 1
        record = {"step": self.step, **record}
        show_blocks = self.step % self.cfg.log.block_loss_every == 0
        self.metrics.log_step(record, block_loss if show_blocks else None)

    def _leave(self, stop: StopVote) -> None:
        log.warning("stopping after step %d of %d: %s. Checkpoint step_%08d is written; exit "
                    "code %d asks the launcher to requeue the job (tools/slurm/train.sbatch "
                    "does), and the same command resumes", self.step, self.cfg.train.steps,
                    stop.reason(self.dims.world_size, self.stop.max_minutes), self.step,
                    REQUEUE_EXIT_CODE)
        raise Preempted()

    def _profiler(self) -> StepProfiler:
        log = self.cfg.log
        return StepProfiler(os.path.join(self.cfg.run_dir, "profile"), start=log.profile_start,
                            steps=log.profile_steps, rank=self.dims.rank)

    def _to_device(self, batch, drop=None):
        tokens = batch.tokens.to(self.dims.device, non_blocking=True)
        if self.layout.text_len:  # text-conditional: the shards' .text.npy, in fixed form
            return self.layout.build(tokens, drop=drop, text=batch.text.to(self.dims.device))
        labels = batch.labels.to(self.dims.device) if self.layout.prefix_len else None
        return self.layout.build(tokens, labels, drop)

    def _cond_drop(self, batch):
        """Clips trained without their condition this step (model.cond_dropout), or None."""
        from nbp_mega.model.sequence import cond_drop_mask

        p = self.cfg.model.cond_dropout
        if not p:
            return None
        return cond_drop_mask(self.cfg.seed, self.step, self.cfg.train.global_batch,
                              batch.first_position, len(batch.keys), p)

    def train_step(self, batch) -> tuple[dict, torch.Tensor]:
        """One optimizer step over this rank's share of a global batch."""
        start = time.perf_counter()
        self.engine.train()
        input_ids, targets = self._to_device(batch, self._cond_drop(batch))  # [b, S], [b, Nt]
        lr = self.engine.get_lr()[0]  # the rate this step uses (the scheduler moves on)
        if self.dims.pp > 1:
            block_loss = self._pipeline_step(input_ids, targets)
        else:
            block_loss = torch.zeros(self.layout.num_target_blocks, dtype=torch.float64,
                                     device=self.dims.device)  # [nb]; no host sync per micro
            for i in range(self.accum):
                rows = slice(i * self.micro, (i + 1) * self.micro)
                token_loss = self.engine(input_ids[rows], targets[rows])  # [m, Nt]
                self.engine.backward(token_loss.mean())
                with record_function("nbp.optimizer"):
                    self.engine.step()
                block_loss += self.layout.loss_per_block(token_loss)
        block_loss = all_reduce_(block_loss / self.accum, self.dims.dp_group, mean=True).cpu()
        data = self._data_record(batch)
        seconds = time.perf_counter() - start
        return {**self._record(block_loss.mean().item(), lr, seconds), **data}, block_loss

    def _micro_batches(self, input_ids, targets):
        """(input_ids, targets) of each micro-batch, in order: what DeepSpeed's pipeline
        engine pulls (stage 0 uses the inputs, the last stage the targets)."""
        return iter([(input_ids[i : i + self.micro], targets[i : i + self.micro])
                     for i in range(0, input_ids.shape[0], self.micro)])

    def _block_loss_sum(self) -> tuple[torch.Tensor, int]:
        """The per-block loss summed over the micro-batches the pipeline just ran, and their
        count, on every stage: the last stage computed them (StageLoss) and sends them."""
        from nbp_mega.parallel.pipeline import StageLoss

        loss_fn = self.engine.module.loss_fn
        block_sum, count = (loss_fn.take if isinstance(loss_fn, StageLoss) else
                            StageLoss.nothing)(self.layout.num_target_blocks, self.dims.device)
        packed = all_reduce_(torch.cat([block_sum, block_sum.new_tensor([count])]),
                             self.dims.pp_group)
        return packed[:-1], int(packed[-1].item())

    def _pipeline_step(self, input_ids, targets) -> torch.Tensor:
        """One step through DeepSpeed's pipeline engine (1F1B over the accumulation
        micro-batches, then the optimizer) -> this replica's per-block loss x accumulation."""
        self.engine.train_batch(self._micro_batches(input_ids, targets))
        return self._block_loss_sum()[0]

    def _data_record(self, batch) -> dict:
        """The global batch's digest and the broken shards met so far, summed over ranks."""
        from nbp_mega.data.stream import format_digest

        sums = torch.tensor([batch.digest_part(), self.loader.skipped_shards],
                            dtype=torch.int64)
        digest, skipped = all_reduce_(sums, self.dims.dp_group).tolist()
        return {"batch_digest": format_digest(digest), "data_skipped_shards": skipped}

    def _record(self, loss: float, lr: float, seconds: float) -> dict:
        from nbp_mega.metrics import peak_memory_gb

        tokens = self.cfg.train.global_batch * self.layout.num_targets
        tflops = self.flops_per_token * tokens / seconds / 1e12 / self.dims.world_size
        grad_norm = self.engine.get_global_grad_norm()
        return {
            "loss": loss,
            "lr": lr,
            "grad_norm": float(grad_norm) if grad_norm is not None else None,
            "tokens_per_s": tokens / seconds,
            "tflops_per_device": tflops,
            "mfu": tflops / self.peak_tflops if self.peak_tflops else None,
            "step_seconds": seconds,
            "memory_gb": peak_memory_gb(self.dims.device),
        }

    @torch.no_grad()
    def evaluate(self) -> float | None:
        """Mean validation loss per target token over train.eval_batches global batches."""
        from nbp_mega.data.loader import TextSpec, eval_batches

        if self.val_index is None:
            return None
        self.engine.eval()
        # [loss sum, targets] on the model's device: no host sync per micro batch.
        total = torch.zeros(2, dtype=torch.float64, device=self.dims.device)
        for batch in eval_batches(self.val_index, batch_size=self.cfg.train.global_batch,
                                  dp_rank=self.dims.dp_rank, dp_size=self.dims.dp,
                                  max_batches=self.cfg.train.eval_batches,
                                  grid=tuple(self.cfg.model.grid),
                                  vocab_size=self.cfg.model.vocab_size,
                                  text=TextSpec.from_model(self.cfg.model)):
            input_ids, targets = self._to_device(batch)
            if self.dims.pp > 1:  # the last stage's per-block means, on every stage
                self.engine.eval_batch(self._micro_batches(input_ids, targets),
                                       bcast_loss=False)
                block_sum, count = self._block_loss_sum()
                total[0] += block_sum.sum() * self.micro * self.layout.block_len
                total[1] += count * self.micro * self.layout.num_targets
                continue
            for rows in torch.split(torch.arange(input_ids.shape[0]), self.micro):
                token_loss = self.engine(input_ids[rows], targets[rows])  # [m, Nt]
                total[0] += token_loss.double().sum()
                total[1] += token_loss.numel()
        loss_sum, count = all_reduce_(total, self.dims.dp_group).tolist()
        val_loss = loss_sum / count
        self.metrics.log_eval(self.step, val_loss)
        return val_loss
