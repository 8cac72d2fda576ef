"""Merged Hugging Face folders, one job per module (nothing is imported here):

files     what a merged folder holds: the tensor plan, dtypes, side files, merge
          record; the checks every merged value passes (ExportError)
folder    the output folder's life: checked, locked, built in a temporary sibling,
          renamed into place
source    what a merge starts from: an adapter or a checkpoint, opened by its method
offline   the streaming merge on any CPU machine (merge_offline)
zero3     the merged export from a ZeRO-3 run, as the method's shard_merger says
          (export_run: every rank writes its shards, or gathered through rank 0)
verify    the merged folder's logits against base + adapter
cli       python -m gpart_ds.export [verify] (__main__ runs it)
"""
