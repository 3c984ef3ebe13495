"""What the commands that do not train load at start-up: not Lightning, not torch-fidelity's models.

Every such import is seconds of start-up on a small machine for each command, one-line errors
included; they are loaded where they are first needed (eval.gfid's Fabric, the Inception network).
"""
import subprocess
import sys

from conftest import REPO

LIGHT = ("sampling.generate", "tokenizer.reconstruct", "generator.fit_sampling", "eval.gfid")


def test_the_commands_that_do_not_train_start_without_lightning_or_torch_fidelity():
    script = (f"import importlib, sys; [importlib.import_module(m) for m in {LIGHT!r}]; "
              "print(sorted({m.split('.')[0] for m in sys.modules} & {'lightning', 'torch_fidelity', 'torchvision'}))")
    proc = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "[]", proc.stdout
