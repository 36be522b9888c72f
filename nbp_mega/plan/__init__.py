"""The parallelism planner: which (tensor, data, pipeline, ZeRO stage, optimizer offload,
micro batch, activation checkpointing) layout to train a config with on a given cluster.

    python -m nbp_mega.plan configs/nbp_3b.yaml --gpus 32 --gpu-mem 80 [--json]

layout.py (what a plan is about), shapes.py (the model's parameters from its config),
memory.py (bytes per GPU by component and phase), zero3.py (ZeRO-3's gathered parameters),
cost.py (step time = compute + communication), search.py (enumerate, evaluate, pick),
report.py (table and JSON). tools/bench_memory.py measures what memory.py estimates.
"""

from nbp_mega.plan.layout import Cluster, Job, Layout, ZeroSettings
from nbp_mega.plan.memory import Memory, training_memory
from nbp_mega.plan.search import PlanError, search

__all__ = ["Cluster", "Job", "Layout", "Memory", "PlanError", "ZeroSettings", "search",
           "training_memory"]
