"""Build script. The package is pure Python; the optional compiled extension of csrc/ is added here."""

from setuptools import setup

setup()
