"""Names the command line offers before torch loads (``--help`` stays fast): a device and a precision
(resolved in runtime.py), a data loader (decided in data/source.py), and ``--resume auto`` (decided in
checkpoint.check_run_dir)."""

DEVICES = ("auto", "cpu", "cuda", "mps")
PRECISIONS = ("auto", "fp32", "bf16", "fp16")
AUTO = "auto"  # --resume auto: continue the run where it holds a complete epoch, else start it
LOADERS = ("auto", "memory", "stream")  # --data-loader: folders held in memory or streamed from disk
