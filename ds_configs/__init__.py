"""DeepSpeed JSON files (ZeRO and precision only), shipped as package data: ``redi_ds.ds_configs``."""
