"""KempnerForge: SLURM-native PyTorch training with fault-tolerant, bit-exact auto-resume."""

from kempnerforge.log import install_default_handler as _install_default_handler

__version__ = "0.1.0"

_install_default_handler()  # progress lines visible by default (kempnerforge.log)
