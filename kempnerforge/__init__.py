"""KempnerForge: SLURM-native PyTorch training with fault-tolerant, bit-exact auto-resume."""

__version__ = "0.1.0"
