"""Code the test tiers share, imported as ``helpers``.

pytest puts ``tests/`` on ``sys.path`` (``pythonpath`` in pyproject.toml); a worker script that a
test starts in a child process gets it through ``PYTHONPATH`` (see :mod:`helpers.torchrun`).
"""
