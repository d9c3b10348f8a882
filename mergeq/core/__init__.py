"""mergeq's core layer: what merge/, exporters/ and the app share (errors, atomic writes, hashing, locks, paths,
memory, progress, fault hooks, text loading, checkpoint reading, shard writing, model-folder files, metrics,
devices, the layer-by-layer forward and its architecture map, installed package versions). Nothing here imports
merge/, exporters/ or the app (mergeq.* outside core); tests/test_layering.py enforces it."""

VERSION = "0.1.0"
