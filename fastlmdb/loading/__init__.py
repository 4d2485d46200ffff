"""The PyTorch side, the only part that imports torch: datasets, decode-aware crops, batches
decoded in place and their hand-over between processes, epoch order, the sampler."""
