"""Shard writing and streaming for MLP-Mixer pre-training.

Modules (import the one you need; this package root stays import-light):
    shards      write/read webdataset tar shards and their JSON manifest
    urls        turn a data spec (brace pattern, ``::`` list, manifest) into shard URLs
    transforms  decode + crop/flip on the CPU (PIL/numpy, uint8 out)
    stream      TrainLoader (infinite, sharded, resumable) and eval_batches (one pass)
    device      normalisation on the accelerator
    synthetic, digits, demo   the demo's small data sets
"""
from data_pipeline.errors import DataSpecError

__all__ = ["DataSpecError"]
