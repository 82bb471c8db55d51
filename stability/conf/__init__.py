"""The Hydra config tree, shipped inside the package (Hydra finds it as ``pkg://stability.conf``).

``config.yaml`` (the root: the schema of ``stability/config.py`` + a recipe + a size preset),
groups ``recipe/``, ``size/``, ``detectors/``, ``hydra/launcher/``, ``hydra/job_logging/``, and
``sweep/``: the named studies (``+sweep=NAME``, Hydra multirun configs). YAML only sets values;
the schema and its docstrings are the dataclasses.
"""
