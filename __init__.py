"""GranViT as an installed package.

Importing ``granvit`` registers the model natively with the ``Auto*`` classes (no ``trust_remote_code`` needed while
the package is installed) and marks the classes for ``auto_map`` so every saved checkpoint carries the Hub ``.py``
files and loads with ``trust_remote_code=True`` where the package is not installed.
"""

if __name__ != "granvit":
    # pytest imports a repository-root __init__.py by path, under the folder's name; a second copy of every class
    # would then be registered next to the real one. Alias the installed package instead.
    import importlib
    import sys

    sys.modules[__name__] = importlib.import_module("granvit")
else:
    from .registration import *  # noqa: F401,F403
    from .registration import __all__  # noqa: F401
