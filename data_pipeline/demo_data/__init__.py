"""The demo's small data sets: synthetic glyphs (pre-training) and digits (downstream)."""
