import torch

import pipegear


def test_version_matches_the_extension():
    assert pipegear.__version__ == pipegear._C.__version__
    assert pipegear.__version__.count(".") == 2


def test_the_core_never_imports_transformers():
    """pipegear.models imports transformers only when a recipe runs."""
    import subprocess
    import sys

    code = ("import sys, pipegear, pipegear.models, pipegear.models.data; "
            "print('transformers' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True,
                         text=True, check=True)
    assert out.stdout.strip() == "False", out.stderr
