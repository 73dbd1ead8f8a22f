"""stroke-tss: distributed training for MRI stroke onset-time classification."""

from setuptools import find_packages, setup

setup(
    name="stroke-tss",
    version="0.1.0",
    description=(
        "Multi-phase transfer learning for acute ischemic stroke onset time (TSS) from MRI, "
        "on Zarr stores, DDP/DeepSpeed and Slurm"
    ),
    python_requires=">=3.10",
    # the top-level configs/ ships inside the package as stroke_tss/configs (found by stroke_tss.demo.CONFIGS)
    packages=[*find_packages(include=["data_prep*", "stroke_tss*", "hpc*"]), "stroke_tss.configs"],
    package_dir={"stroke_tss.configs": "configs"},
    package_data={"stroke_tss.configs": ["*.yaml", "deepspeed/*.json"]},
    install_requires=[
        # 2.13.0 (the CPU wheel on the dev box) must satisfy this range; no torchvision.
        "torch>=2.4,<3",
        "deepspeed>=0.15",
        "numpy>=1.24",
        "scipy>=1.10",
        "pandas>=2.0",
        "nibabel>=5.0",
        "zarr>=3.0",
        "numcodecs>=0.13",
        "dask[distributed]>=2024.1",
        "dask-jobqueue>=0.8",
        "submitit>=1.5",
        "cloudpickle>=2.0",
        "scikit-learn>=1.3",
        "monai>=1.3",
        "SimpleITK>=2.3",
        "nilearn>=0.10",
        "matplotlib>=3.7",
        "pyyaml>=6.0",
        "pydantic>=2.5",
        "pytorch-optimizer>=3.0",
        "tqdm>=4.60",
        "psutil>=5.9",
    ],
    extras_require={
        "dev": ["pytest>=7.4", "pytest-timeout>=2.2", "hypothesis>=6.80", "ruff>=0.4", "adabound==0.0.5",
                "import-linter>=2.16"],
    },
    entry_points={"console_scripts": ["stroke-tss=stroke_tss.cli:main"]},
)
