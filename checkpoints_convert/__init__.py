"""Checkpoint conversion CLIs (thin layers over vppo_megatron.convert and vppo_megatron.actor.checkpoint):

python -m checkpoints_convert.hf_to_megatron --hf DIR --out DIR --tp N --pp M [--vpp V] [--verify]
python -m checkpoints_convert.megatron_to_hf --megatron DIR --out DIR [--tp N --pp M --vpp V] [--hf-config DIR]
    [--verify]

Both take --first-stage-layers / --last-stage-layers for an uneven pipeline split (0: even).
"""
