"""The shard and manifest format (the one owner of the manifest): writing, reading, indexing, data specs."""
