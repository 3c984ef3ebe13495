"""``python -m generator.cache``: see :mod:`generator.cache.command`."""
from generator.cache.command import main

main()
