"""GPart fine-tuning under DeepSpeed ZeRO-3.

Layout of the package (one job per module):
    partition  group ids, counts, scales (pure torch)
    kernels    fused hash + gather / scatter kernels (torch.compile or eager)
    ops        the GPart linear autograd op
    transform  targets, canonical layout, theta on the root module
    zero3      ZeRO-3 shard geometry and DeepSpeed config plumbing
    config     the YAML schema and its validation
    data       JSON-lines prompt/completion data and batching
    adapter    adapter files (theta + config)
    trainer    the training loop that wires the above
"""
__version__ = "0.1.0"
