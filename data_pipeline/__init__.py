"""Shard writing and streaming for MLP-Mixer pre-training.

The top-level modules are the command-line tools (``python -m data_pipeline.<tool>``); the sub-packages
hold the library, one job each (import the module you need; this package root stays import-light):

    write               image folder / list file / existing shards -> shards + manifest, any fsspec URL
    index               a manifest for shards written elsewhere (counts, offsets), resumable
    prepare_downstream  CIFAR / Pets / Flowers / image folders -> evaluation shards
    demo                the demo's data sets, generated once under data.root

    storage/    reaching URLs: the Storage handle (fsspec per scheme) and the one retry layer (time budget)
    shards/     the shard and manifest format, its one owner: manifest (format 2 header, publish, read,
                convert; docs/manifest.md), table (per-shard columns), offsets (a shard's sample offsets,
                read by the worker), labels (cls / txt / json:FIELD), tar_write, tar_read (members ->
                samples), index (counting shards), spec (data spec -> shard URLs)
    stream/     the streams: plan (the global epoch plan), sources (manifests -> counts, offsets),
                epoch_reader (a worker's samples by position, range reads), train_loader (rank side),
                train_worker (DataLoader worker side), eval_stream, batch, decode (sample -> pixels, label),
                workers (signal handling in DataLoader workers)
    image/      transforms (CPU decode + crop/flip, uint8), augment (RandAugment, mixup/cutmix),
                gpu_decode (nvJPEG), device (BatchToDevice: host batch -> model inputs)
    demo_data/  synthetic glyphs and digits, the demo's small data sets
"""
from data_pipeline.errors import DataSpecError

__all__ = ["DataSpecError"]
