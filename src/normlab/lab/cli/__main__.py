"""``python -m normlab.lab.cli`` (what torchrun runs on every worker): the ``normlab`` command."""

from normlab.lab.cli import main

main()
