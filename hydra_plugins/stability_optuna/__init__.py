"""Optuna for Hydra multiruns on optuna >= 4: ``hydra/sweeper=optuna``.

hydra-optuna-sweeper 1.2 pins optuna < 3, whose import breaks under ``-W error`` (SQLAlchemy 2
warnings); this plugin is the small part of it we use, on optuna's ask/tell API, with a study
stored in SQLite in the sweep directory so that a search can be continued and inspected.
See docs/sweeps.md.

``hydra_plugins`` is a namespace package (no ``__init__.py``): Hydra finds this plugin next to
the installed ones (hydra_joblib_launcher, hydra_submitit_launcher).
"""
