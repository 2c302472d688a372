"""The network (``network``: history encoder + bidirectional diffusion decoder, nanoGPT-style
in one file), its training objectives (``objectives``: OCN, random masking, AR, dense),
and the safetensors export (``export``)."""
