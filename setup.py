"""redi-ds: REDI (Reinforcement Distillation) for small reasoning models on DeepSpeed.

Everything that ships lives under ``redi_ds/``: packages are discovered, and every non-Python file under it
(configs, DeepSpeed JSON, tokenizers, eval sets) is package data, so a regular, non-editable install runs every
command. Nothing else is a top-level module: the checkout's ``kernels/`` (microbenchmarks), ``launch/`` and
``tests/`` are folders of scripts without ``__init__.py``, so none of them can shadow a PyPI package of the
same name (transformers imports PyPI's ``kernels``).
"""

from setuptools import find_packages, setup

setup(
    name="redi-ds",
    version="0.1.0",
    description="REDI reinforcement distillation with fused log-prob kernels on DeepSpeed ZeRO-3",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["redi_ds", "redi_ds.*"]),
    package_data={"redi_ds": ["assets/**/*", "configs/*.yaml", "ds_configs/*.json"]},
    include_package_data=False,
    # torch is deliberately unpinned here: GPU users keep their CUDA build; CPU installs
    # use constraints-cpu.txt, which pins the CPU wheel and the versions tested together.
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
        "packaging",
        "peft>=0.13",
    ],
    extras_require={
        "test": ["pytest>=8", "ruff", "triton>=3.0", "liger-kernel>=0.5"],
        "gpu": ["flash-attn>=2.6", "liger-kernel>=0.5", "triton>=3.0"],
        "bench": ["liger-kernel>=0.5", "cut-cross-entropy"],
    },
    entry_points={"console_scripts": ["redi-ds=redi_ds.__main__:main"]},
)
