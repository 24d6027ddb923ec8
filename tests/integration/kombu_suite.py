"""kombu's own integration mixins, fetched from the package index at test time.

kombu's sdist ships ``t/integration/common.py``: the mixins (``BasicFunctionality``,
``BaseExchangeTypes``, ``BaseTimeToLive``, ``BasePriority``, ``BaseMessage``,
``BaseEventLoop``) that kombu runs against each of its own transports.  Their code is
not ours to commit, so :func:`load_common` downloads the sdist of the *installed*
kombu version with pip, extracts that one file into a cache directory keyed by the
version, and imports it.  Later runs reuse the cached file and need no network.

If the file cannot be had, :func:`load_common` raises :class:`SuiteUnavailable`, and
:func:`unavailable_suite` builds stand-in mixins whose one test fails with the
reason: the suite fails loudly, it is never skipped, and the rest of the run is
not stopped by a collection error.
"""

from __future__ import annotations

import atexit
import importlib
import importlib.metadata
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
import types
from pathlib import Path
from typing import Any

import pytest

#: The file of kombu's sdist that holds the mixins.
COMMON_MEMBER = "t/integration/common.py"
#: The mixins the tests use; a stand-in class is built for each when unavailable.
MIXINS = (
    "BasicFunctionality",
    "BaseExchangeTypes",
    "BaseTimeToLive",
    "BasePriority",
    "BaseMessage",
    "BaseEventLoop",
)
#: Name the extracted file is imported under (no clash with a ``common`` elsewhere).
MODULE_NAME = "kombu_integration_common"
DOWNLOAD_ATTEMPTS = 2
RETRY_DELAY_SECONDS = 3.0
PIP_TIMEOUT_SECONDS = 300

_cache_root: Path | None = None


class SuiteUnavailable(RuntimeError):
    """kombu's integration mixins could not be downloaded, extracted or imported."""


def set_cache_root(path: Path) -> None:
    """Where downloads are kept (the conftest points it into pytest's cache dir)."""
    global _cache_root
    _cache_root = Path(path)


def kombu_version() -> str:
    return importlib.metadata.version("kombu")


def cache_dir(version: str) -> Path:
    global _cache_root
    if _cache_root is None:  # no pytest cache (``-p no:cacheprovider``): this run only
        _cache_root = Path(tempfile.mkdtemp(prefix="kombu-suite-"))
        atexit.register(shutil.rmtree, _cache_root, True)
    path = _cache_root / f"kombu-{version}"
    path.mkdir(parents=True, exist_ok=True)
    return path


def load_common() -> types.ModuleType:
    """kombu's ``t/integration/common.py`` for the installed kombu, imported."""
    if MODULE_NAME in sys.modules:
        return sys.modules[MODULE_NAME]
    version = kombu_version()
    directory = cache_dir(version)
    target = directory / f"{MODULE_NAME}.py"
    if not target.exists():
        _fetch(version, directory, target)
    # Imported through the normal machinery so pytest rewrites its asserts: a failing
    # mixin test then shows the values it compared, not a bare AssertionError.
    pytest.register_assert_rewrite(MODULE_NAME)
    sys.path.insert(0, str(directory))
    try:
        return importlib.import_module(MODULE_NAME)
    except Exception as exc:
        sys.modules.pop(MODULE_NAME, None)
        raise SuiteUnavailable(
            f"kombu {version}'s {COMMON_MEMBER} (cached as {target}) does not import: "
            f"{type(exc).__name__}: {exc}; delete {directory} to download it again"
        ) from exc
    finally:
        sys.path.remove(str(directory))


def _fetch(version: str, directory: Path, target: Path) -> None:
    """Download the sdist (a second attempt after a pause) and extract the mixins."""
    errors = []
    for attempt in range(1, DOWNLOAD_ATTEMPTS + 1):
        try:
            sdist = _existing_sdist(directory, version) or _download(version, directory)
            _extract(sdist, target)
            sdist.unlink()  # the extracted file is all later runs need
            return
        except SuiteUnavailable as exc:
            errors.append(f"attempt {attempt}: {exc}")
            # A truncated download would fail the same way forever: start afresh.
            for stale in directory.glob("kombu-*"):
                if stale.is_file():
                    stale.unlink()
            if attempt < DOWNLOAD_ATTEMPTS:
                time.sleep(RETRY_DELAY_SECONDS)
    raise SuiteUnavailable(
        f"cannot get kombu's integration suite ({COMMON_MEMBER} from the sdist of the "
        f"installed kombu {version}) with `{' '.join(_pip_command(version, directory))}`:\n"
        + "\n".join(errors)
    )


def _pip_command(version: str, directory: Path) -> list[str]:
    return [
        sys.executable, "-m", "pip", "download",
        "--no-binary", ":all:", "--no-deps",
        "--disable-pip-version-check", "--no-input",
        f"kombu=={version}", "-d", str(directory),
    ]


def _existing_sdist(directory: Path, version: str) -> Path | None:
    candidate = directory / f"kombu-{version}.tar.gz"  # the one sdist format (PEP 625)
    return candidate if candidate.is_file() else None


def _download(version: str, directory: Path) -> Path:
    try:
        done = subprocess.run(
            _pip_command(version, directory),
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=PIP_TIMEOUT_SECONDS,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise SuiteUnavailable(f"pip did not run to completion: {exc}") from exc
    if done.returncode != 0:
        output = (done.stderr.strip() or done.stdout.strip()).splitlines()
        # pip's ERROR lines, after its last warning (the network error it retried on).
        errors = [line for line in output if line.startswith("ERROR")]
        warnings = [line for line in output if line.startswith("WARNING")]
        shown = warnings[-1:] + errors if errors else output[-5:]
        raise SuiteUnavailable(f"pip exited {done.returncode}: " + " / ".join(shown))
    sdist = _existing_sdist(directory, version)
    if sdist is None:
        found = sorted(p.name for p in directory.iterdir())
        raise SuiteUnavailable(f"pip succeeded but left no kombu-{version} sdist: {found}")
    return sdist


def _extract(sdist: Path, target: Path) -> None:
    """Copy ``<top>/t/integration/common.py`` out of the sdist, atomically."""
    partial = target.with_name(target.name + ".partial")
    try:
        with tarfile.open(sdist, "r:gz") as archive:
            member = next(
                (
                    m for m in archive.getmembers()
                    if m.isfile() and m.name.split("/", 1)[-1] == COMMON_MEMBER
                ),
                None,
            )
            if member is None:
                raise SuiteUnavailable(f"{sdist.name} has no {COMMON_MEMBER}")
            source = archive.extractfile(member)
            assert source is not None
            with source, open(partial, "wb") as out:
                shutil.copyfileobj(source, out)
    except (OSError, tarfile.TarError, EOFError) as exc:
        raise SuiteUnavailable(f"cannot read {sdist.name}: {exc}") from exc
    partial.replace(target)


def unavailable_suite(reason: str) -> types.ModuleType:
    """Stand-ins for the mixins: each contributes one test, failing with ``reason``."""
    module = types.ModuleType(MODULE_NAME)

    def test_kombu_integration_suite(self: Any) -> None:
        pytest.fail(reason, pytrace=False)

    for name in MIXINS:
        setattr(module, name, type(name, (), {
            "test_kombu_integration_suite": test_kombu_integration_suite,
        }))
    return module
