from kempnerforge.checkpoint.config import AsyncCheckpointMode, CheckpointConfig  # noqa: F401
