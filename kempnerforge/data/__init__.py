"""Token datasets (memory-mapped file or synthetic) and a resumable sampler by global sample index.

Preparing a real token file from text: see ``kempnerforge/data/README.md``.
"""

from kempnerforge.data.dataset import TokenDataset, build_dataset, load_token_file, synthetic_tokens
from kempnerforge.data.loader import StepLoader
from kempnerforge.data.sampler import GlobalSampler

__all__ = [
    "GlobalSampler",
    "StepLoader",
    "TokenDataset",
    "build_dataset",
    "load_token_file",
    "synthetic_tokens",
]
