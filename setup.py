"""What pyproject.toml cannot say: files outside the packages that ship in the wheel.

The demo and bench configs and the reference model the demo prunes live at the top
of the source tree; a wheel carries them as package data under copal/shipped/, in
the same layout (configs/demo.yaml → copal/shipped/configs/demo.yaml), where
copal.paths.shipped finds them in an install. Everything else is in pyproject.toml.
"""

from setuptools import find_packages, setup

SHIPPED = {"copal.shipped.configs": "configs", "copal.shipped.data.models.reference": "data/models/reference"}

setup(
    packages=find_packages(include=["cli*", "copal*", "flows*", "tasks*"]) + list(SHIPPED),
    package_dir=SHIPPED,
    # copal's builtin lm-eval task YAMLs (their items are generated at run time), and the shipped files.
    package_data={"copal.lm_tasks": ["*.yaml"], **{name: ["*"] for name in SHIPPED}},
)
