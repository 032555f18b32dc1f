"""Drives the project's CMake build (torchaudio's pattern).

`pip install --no-build-isolation .` builds libpipegear and pipegear._C with
CMake against the torch of the running interpreter and puts both into the
wheel, with the C++ package beside them, so that LibTorch programs can use
the pip-installed pipegear (find_package(pipegear) with
CMAKE_PREFIX_PATH=pipegear.cmake_prefix_path):

    pipegear/_C.<abi>.so                  links lib/libpipegear.so.0
    pipegear/lib/libpipegear.so.0         the only copy of the library
    pipegear/include/pipegear/*.h
    pipegear/share/cmake/pipegear/*.cmake

`pip install --no-build-isolation -e .` builds them in place.
"""
import os
import subprocess
import sys
from pathlib import Path

from setuptools import Extension, find_packages, setup
from setuptools.command.build_ext import build_ext

ROOT = Path(__file__).resolve().parent


class CMakeExtension(Extension):
    def __init__(self, name: str) -> None:
        super().__init__(name, sources=[])


class CMakeBuild(build_ext):
    def build_extension(self, ext: Extension) -> None:
        import torch

        out = Path(self.get_ext_fullpath(ext.name)).resolve().parent
        build = Path(os.environ.get("PIPEGEAR_BUILD_DIR", ROOT / "build" / "setup"))
        build.mkdir(parents=True, exist_ok=True)
        cfg = [
            "cmake", "-S", str(ROOT), "-B", str(build),
            f"-DCMAKE_PREFIX_PATH={torch.utils.cmake_prefix_path}",
            f"-DPython3_EXECUTABLE={sys.executable}",
            f"-DPIPEGEAR_PYTHON_OUT={out}",
            "-DPIPEGEAR_BUILD_TESTS=OFF",
            # _C finds the library at $ORIGIN/lib (CMakeLists.txt).
            "-DCMAKE_INSTALL_LIBDIR=lib",
        ]
        if subprocess.call(["ninja", "--version"], stdout=subprocess.DEVNULL) == 0:
            cfg += ["-G", "Ninja"]
        subprocess.check_call(cfg)
        subprocess.check_call(["cmake", "--build", str(build), "-j",
                               str(os.cpu_count() or 2), "--target",
                               "pipegear_python"])
        # The C++ package into the Python one. Not the libpipegear.so link
        # (component pipegear_namelink): a wheel cannot hold a symbolic
        # link, so it would be a second copy of the library.
        for component in ("pipegear_runtime", "pipegear_development"):
            subprocess.check_call(["cmake", "--install", str(build),
                                   "--prefix", str(out),
                                   "--component", component])


setup(
    packages=find_packages("python"),
    package_dir={"": "python"},
    package_data={"pipegear": ["py.typed", "*.pyi"]},
    ext_modules=[CMakeExtension("pipegear._C")],
    cmdclass={"build_ext": CMakeBuild},
    zip_safe=False,
)
