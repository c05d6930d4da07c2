"""redi-ds: REDI reinforcement distillation on DeepSpeed."""

__version__ = "0.1.0"
