import torch

import pipegear


def test_version_matches_the_extension():
    assert pipegear.__version__ == pipegear._C.__version__
    assert pipegear.__version__.count(".") == 2
