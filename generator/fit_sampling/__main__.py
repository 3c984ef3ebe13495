"""``python -m generator.fit_sampling``: see :mod:`generator.fit_sampling.command`."""
from generator.fit_sampling.command import main

main()
