"""VPPO (Visually-Perceptive Policy Optimization) on Megatron-core, vLLM and Ray."""

__version__ = "0.1.0"
