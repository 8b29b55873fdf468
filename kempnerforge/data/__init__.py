"""Token datasets (memory-mapped file or synthetic) and a resumable sampler by global sample index."""
