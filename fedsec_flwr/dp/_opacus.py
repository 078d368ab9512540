"""The parts of Opacus this package uses, imported without a log side effect.

Importing Opacus calls ``logging.basicConfig``, which gives the root logger
a handler when it has none. Every record that reaches the root logger is
then printed, Flower's DEBUG records included. This module imports Opacus
once and removes the handlers that the import added, so a process's logging
stays as its owner set it up.
"""

import logging

_root = logging.getLogger()
_handlers_before = list(_root.handlers)

from opacus import PrivacyEngine  # noqa: E402
from opacus.accountants import PRVAccountant  # noqa: E402
from opacus.accountants.analysis import rdp as opacus_rdp  # noqa: E402
from opacus.grad_sample import AbstractGradSampleModule  # noqa: E402
from opacus.utils.module_utils import trainable_modules  # noqa: E402
from opacus.validators import ModuleValidator  # noqa: E402

for _handler in list(_root.handlers):
    if _handler not in _handlers_before:
        _root.removeHandler(_handler)

__all__ = [
    "AbstractGradSampleModule",
    "ModuleValidator",
    "PRVAccountant",
    "PrivacyEngine",
    "opacus_rdp",
    "trainable_modules",
]
