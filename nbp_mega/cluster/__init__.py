"""Running on clusters: SLURM allocations and jobs (slurm.py), multi-host launches (hosts.py)."""
