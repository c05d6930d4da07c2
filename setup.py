"""redi-ds: REDI (Reinforcement Distillation) for small reasoning models on DeepSpeed.

The top-level ``kernels/`` folder ships as ``redi_ds.kernels`` (never as a top-level
module ``kernels``: a PyPI package of that name exists and transformers probes for it), and
``ds_configs/`` (the DeepSpeed JSON files) as ``redi_ds.ds_configs``, so a non-editable install trains.
"""

from setuptools import setup

PACKAGES = [
    "redi_ds",
    "redi_ds.configs",
    "redi_ds.data",
    "redi_ds.losses",
    "redi_ds.eval",
    "redi_ds.kernels",
    "redi_ds.ds_configs",
]

setup(
    name="redi-ds",
    version="0.1.0",
    description="REDI reinforcement distillation with fused log-prob kernels on DeepSpeed ZeRO-3",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=PACKAGES,
    package_dir={"redi_ds.kernels": "kernels", "redi_ds.ds_configs": "ds_configs"},
    package_data={
        "redi_ds": ["assets/tokenizer/*/*", "assets/data/*", "assets/eval/*", "assets/eval/*/*"],
        "redi_ds.configs": ["*.yaml"],
        "redi_ds.kernels": ["*.md"],
        "redi_ds.ds_configs": ["*.json"],
    },
    include_package_data=False,
    # torch is deliberately unpinned here: GPU users keep their CUDA build; CPU installs
    # use constraints-cpu.txt, which pins the CPU wheel.
    install_requires=[
        "torch>=2.4",
        "deepspeed>=0.16",
        "transformers>=4.56",  # sdpa packing from position_ids; the dtype= keyword
        "datasets>=3.0",
        "accelerate>=1.0",
        "safetensors",
        "mlflow>=2.20",
        "pyyaml>=6",
        "tqdm",
        "math-verify>=0.7",
        "matplotlib",
    ],
    extras_require={
        "test": ["pytest>=8", "ruff", "triton>=3.0", "liger-kernel>=0.5"],
        "gpu": ["flash-attn>=2.6", "liger-kernel>=0.5", "triton>=3.0"],
        "bench": ["liger-kernel>=0.5"],
    },
    entry_points={"console_scripts": ["redi-ds-eval=redi_ds.eval.__main__:main"]},
)
