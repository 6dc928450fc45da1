"""dist_trainer: launch PyTorch DDP training on Ray Train from Hydra configs.

The global batch is split exactly into micro-batch x accumulation steps x workers, and every job
logs one MLflow run. See README.md for launch recipes; `dist-trainer --help` for the verbs.
"""

__version__ = "0.1.0"
