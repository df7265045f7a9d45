"""Shard writing and streaming for MLP-Mixer pre-training.

Modules (import the one you need; this package root stays import-light):
    shards      write/read webdataset tar shards and their JSON manifest
    write       the shard-writer CLI (python -m data_pipeline.write): folder / list / re-shard -> any URL
    index       the manifest builder for shards written elsewhere (python -m data_pipeline.index): counts, offsets
    urls        turn a data spec (brace pattern, ``::`` list, manifest) into shard URLs
    storage     fsspec options per scheme (s3 endpoint/profile/anon), the one retry layer (time budget)
    reader      tar members -> samples; EpochReader fetches samples of an epoch plan by position
    plan        the global epoch plan: sample order, per-rank slices, world-size independent position
    transforms  decode + crop/flip on the CPU (simplejpeg or PIL, uint8 out)
    augment     RandAugment (CPU workers), mixup / cutmix (device)
    gpu_decode  data.decode=gpu: crop planning from JPEG headers, batched nvJPEG decode + crop on device
    batch       Batch: what every stream yields on the host (uint8 images or JPEG bytes, labels, keys)
    decode      one raw tar sample -> (pixels, label) or why it is unusable (SKIP_KINDS)
    sources     DataSource and its resolution from manifests (URLs, counts, offsets)
    train_loader  TrainLoader: infinite, elastic, exactly resumable, weighted sources (rank side)
    train_worker  what each DataLoader worker runs to build its rank batches
    eval_stream eval_batches: one unshuffled pass, split across ranks by shard
    workers     DataLoader worker set-up shared by both streams (preemption signals)
    device      BatchToDevice: a host Batch -> model inputs on the accelerator (GPU decode, normalise, mixup)
    synthetic, digits, demo   the demo's small data sets
"""
from data_pipeline.errors import DataSpecError

__all__ = ["DataSpecError"]
