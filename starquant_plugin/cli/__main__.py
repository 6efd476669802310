"""``python -m starquant_plugin.cli`` is the ``starquant`` command."""

from starquant_plugin.cli import main

main()
