"""The package layout: the core imports no framework; integrations live in precision_ce.integrations."""

from __future__ import annotations

import subprocess
import sys

FRAMEWORKS = ("transformers", "torchtitan", "megatron", "accelerate", "peft", "trl")


def test_import_precision_ce_imports_no_framework_and_exposes_distributed() -> None:
    """A fresh interpreter: ``import precision_ce`` gives ``precision_ce.distributed`` (as torch gives
    ``torch.distributed``) and leaves every training framework unimported; ``precision_ce.hf`` then
    imports transformers on first use."""
    code = (
        "import sys, precision_ce\n"
        "assert precision_ce.distributed.vocab_parallel_cross_entropy\n"
        f"print(sorted(name for name in {FRAMEWORKS!r} if name in sys.modules))\n"
        "precision_ce.hf.apply\n"
        "print('transformers' in sys.modules)\n"
    )
    # cwd outside the repository: its kernels/ folder would shadow the `kernels` package transformers imports.
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd="/")
    assert out.stdout.split("\n")[:2] == ["[]", "True"], out.stdout
