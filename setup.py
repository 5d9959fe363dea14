"""Installs ``hybrid_transfer_keras.pth`` next to the packages (pyproject.toml holds everything else).

The ``.pth`` line runs at interpreter start so that a bare ``import keras`` picks the torch backend when
TensorFlow is not installed (see ``_hybrid_transfer_keras.py``); setuptools has no pyproject option for it.
"""

import os

from setuptools import setup
from setuptools.command.build_py import build_py

PTH = "hybrid_transfer_keras.pth"


class BuildPyWithPth(build_py):
    def run(self):
        super().run()
        self.copy_file(PTH, os.path.join(self.build_lib, PTH), preserve_mode=0)

    def get_outputs(self, include_bytecode=True):
        return [*super().get_outputs(include_bytecode), os.path.join(self.build_lib, PTH)]


setup(cmdclass={"build_py": BuildPyWithPth})
