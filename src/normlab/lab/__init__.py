"""normlab.lab: reproduce the normalization papers' studies on any model and dataset.

Data flows one way::

    CLI (cli.py) -> RunConfig (config.py) -> data (data.py) + model (normlab.models, norm by name)
        -> trainer (trainer.py) -> results store (store.py, SQLite) -> plots.py / report.py

The studies (studies.py) are lists of run configs plus the papers' tables and the claims to check:
``batch-size`` and ``groups`` (Wu & He, "Group Normalization", ECCV 2018), ``norms`` (same paper),
``bn-dropout`` (REFERENCE section 4), ``nf`` (Brock, De & Smith, ICLR 2021; Brock et al. 2021).
Plots and reports read only the store, so ``normlab report DIR`` works on any finished or partial
output directory.
"""

from normlab.lab.config import ConfigError, RunConfig
from normlab.lab.store import Store

__all__ = ["ConfigError", "RunConfig", "Store"]
