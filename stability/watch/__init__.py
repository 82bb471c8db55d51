"""Watching a run from inside the loop: statistics (``monitors.py``), the policy that acts on
detector events (``actions.py``), and fault injection to test both (``fault.py``). The
detectors themselves are torch-free and live in ``stability.detectors``; the config sections of
all of these are in ``config.py`` (importable without torch)."""
