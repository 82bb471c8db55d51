"""An explicit list of jobs for Hydra multiruns: ``hydra/sweeper=jobs``.

The basic sweeper runs a grid (a product of comma lists); a set of studies that share runs is not
a grid. This sweeper reads the jobs from a JSON file, each with its own override list and its own
run sub-directory, and hands them to the configured launcher (``hydra/launcher=local``, ``slurm``
or the basic one). ``analysis.regenerate`` uses it to train the runs its figures are missing::

    python -m stability.train -m hydra/sweeper=jobs hydra.sweeper.jobs_file=jobs.json \\
        hydra.sweep.dir=runs/studies hydra/launcher=local

``hydra_plugins`` is a namespace package (no ``__init__.py``): Hydra finds this plugin next to
the installed ones.
"""
