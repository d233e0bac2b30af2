"""Build script. Pure Python for now; the compiled extensions (relayops._C, relayops._C_cuda)
are added here by the compiled-kernels work."""
from setuptools import setup

setup()
