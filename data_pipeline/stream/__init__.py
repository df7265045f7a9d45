"""The streams: the epoch plan, sources, the epoch reader, the training loader and its workers, the eval pass."""
