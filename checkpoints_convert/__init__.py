"""Checkpoint conversion CLIs (thin layers over vppo_megatron.convert and vppo_megatron.actor.checkpoint):

python -m checkpoints_convert.hf_to_megatron --hf DIR --out DIR --tp N --pp M [--verify]
python -m checkpoints_convert.megatron_to_hf --megatron DIR --out DIR [--tp N --pp M] [--hf-config DIR] [--verify]
"""
