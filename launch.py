"""jaxdef launcher from a checkout: ``python launch.py --config configs/x.py --workdir runs/x [--mode eval]``.

The same as the installed command (:mod:`jaxdef.cli`): ``--mode train`` (the
default) is ``jaxdef train``, ``--mode eval`` is ``jaxdef eval``, and every
other flag is passed on. ``--config configs/x.py:variant`` picks a variant;
``--config.a.b=value`` overrides one field (budgets as fractions:
``--config.attack.eps=8/255``). Mistakes are one ``error:`` line with exit
status 2; see :mod:`jaxdef.cli` for the other exit statuses.
"""

import sys

from jaxdef.cli import from_launch_argv, run

if __name__ == "__main__":
  sys.exit(run(from_launch_argv(sys.argv[1:])))
