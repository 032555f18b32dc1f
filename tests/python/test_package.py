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


def test_cmake_prefix_path_holds_the_cpp_package():
    """pipegear.cmake_prefix_path, as torch.utils.cmake_prefix_path: where
    find_package(pipegear) finds the C++ package installed with this one.
    Present in a wheel and after `make build`; a bare `cmake --build` of
    the source tree does not install it (then this test skips)."""
    import os

    import pytest

    package = os.path.dirname(os.path.abspath(pipegear.__file__))
    assert pipegear.cmake_prefix_path == os.path.join(package, "share",
                                                      "cmake")
    if not os.path.isdir(pipegear.cmake_prefix_path):
        pytest.skip("the C++ package is not installed into the Python one")
    config = os.path.join(pipegear.cmake_prefix_path, "pipegear",
                          "pipegearConfig.cmake")
    assert os.path.isfile(config)
    assert os.path.isfile(os.path.join(package, "include", "pipegear",
                                       "pipegear.h"))
    assert os.path.isfile(os.path.join(package, "lib", "libpipegear.so.0"))
