"""Method modules over one backbone + CAM contract (see `wsss.methods.base`).

Importing this package imports every module in it, and so registers every method and
add-on: a new method is a new module here, with no list to extend.
"""

import importlib
import pkgutil

for _module in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_module.name}")
