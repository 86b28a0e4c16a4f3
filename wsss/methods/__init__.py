"""Method modules over one backbone + CAM contract (see `wsss.methods.base`).

Importing this package registers every method and add-on.
"""

from wsss.methods import cam  # noqa: F401
from wsss.methods import lnl  # noqa: F401
from wsss.methods import deeplab, ocr  # noqa: F401
from wsss.methods import fsae  # noqa: F401
from wsss.methods import csrm  # noqa: F401
from wsss.methods.base import ADDONS, METHODS, build_method, parse_method  # noqa: F401
