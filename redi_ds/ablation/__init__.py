"""The ablation harness: does REDI do what the paper says? See ``python -m redi_ds.ablation --help``."""
