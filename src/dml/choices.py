"""The names a device and a precision are chosen by, resolved in runtime.py. Torch-free, so that the
command line offers them in ``--help`` before torch loads."""

DEVICES = ("auto", "cpu", "cuda", "mps")
PRECISIONS = ("auto", "fp32", "bf16", "fp16")
