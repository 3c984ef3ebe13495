"""``python -m titok_bench.gpu_check``: see :mod:`titok_bench.gpu_check`."""
from titok_bench.gpu_check.command import main

main()
