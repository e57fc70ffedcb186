"""Dataset files: JSONL upload (streamed to the blob store, parsed by a job), export, snapshots."""
