"""``python -m jaxdef COMMAND ...``: the ``jaxdef`` command without its script."""

from jaxdef.cli import main

main()
