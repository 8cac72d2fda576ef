"""GPart fine-tuning under DeepSpeed ZeRO-3 (docs/design.md has the floor plan).

    methods/        one folder per fine-tuning method behind one interface (base.py), and
                    the registry (__init__.py); GPart's math lives in methods/gpart/
    targets         which weights a method adapts and their canonical layout
    config          the YAML schema, overrides and validation
    data            record formats, tokenisation (cached), packing, the global batch order
    objective       label-position loss and the choices objective around any method's model
    evaluate        held-out loss, exact match, accuracy; the evaluate CLI
    model           Hugging Face skeletons and the (ZeRO-3 sharded) load
    zero3, comm     ZeRO-3 shard geometry and the few collectives; distributed: rank discovery
    checkpoint      checkpoint format, save, verify, resume
    export/         merged Hugging Face folders: offline merge, verify, from a run (export.zero3)
    plan, dryrun    per-GPU memory plan; what a run would do, without weights
    trainer         the loop that wires the above; metrics: sinks and progress
    errors, fileio  user-facing errors and exit codes; atomic writes
Experiments (asset recipes, benchmarks, the quality study) live apart, in experiments/.
"""

__version__ = "0.2.0"
