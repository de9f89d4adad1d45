"""fedfuse: privacy-preserving federated learning for multimodal medical data.

The one installed import name. Its subpackages are the Flower app's folders, which stay at the
top of the repository: ``fedfuse.common`` (the library both sides share), ``fedfuse.client``
(the ClientApp), ``fedfuse.server`` (the ServerApp) and ``fedfuse.simulations``; the modules
directly in ``fedfuse/`` are the command line. See docs/DESIGN.md, "One installed name".
"""

from pathlib import Path

# An installed wheel holds the app folders inside this package (pyproject.toml maps them with
# `package-dir`). A source tree -- a clone, the FAB that `flwr run .` ships, the Docker build
# context -- has them next to it instead, so there the tree's root joins this package's search
# path: `fedfuse.server` is then ./server, and Flower (components `fedfuse.server.app:app`),
# the CLI and the tests all load the very files the app ships.
_HERE = Path(__file__).resolve().parent
_APP_FOLDERS = ("common", "client", "server", "simulations")
if not (_HERE / "server").is_dir() and all(
    (_HERE.parent / name / "__init__.py").is_file() for name in _APP_FOLDERS
):
    __path__.append(str(_HERE.parent))
