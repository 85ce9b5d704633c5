"""Many models: a TF Serving model repository (``repository``, one version per task:
``repo_task``), worker processes (``pool``), Apache Beam (``beam``). Imports ``serving`` and
below."""
