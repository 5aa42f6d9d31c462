"""The REST tests again, with the server's database on a real PostgreSQL instead of SQLite.

The REST test modules of tests/api keep SQLite (the `database_url` fixture of tests/api/conftest.py). This
module copies their tests (`test_*` functions, `Test*` classes) and their module-level fixtures and marks into
its own namespace, where pytest collects them a second time; here `database_url` is overridden so that every
test's server gets a fresh database on the session's PostgreSQL server (tests/api/postgres.py). Node ids read
`tests/api/test_rest_postgres.py::<test name>`; a name two modules share is prefixed with its module's name.

The modules are found by name: every tests/api/test_*.py except this one and those in NOT_REST, so a REST
module added later is covered without editing this file, and one not written yet is simply absent.
"""

from __future__ import annotations

import importlib
import types
from pathlib import Path

import pytest

from tests.api.postgres import postgres_server  # noqa: F401

NOT_REST = {"test_system", "test_security", "test_bodies",   # modules of tests/api that are not about the REST API's data
            # heavy flows whose store side the other modules already cover on PostgreSQL (CI time)
            "test_openai", "test_export_api", "test_client", "test_server_log", "test_report_to"}
HERE = Path(__file__)
REST_MODULES = sorted(path.stem for path in HERE.parent.glob("test_*.py")
                      if path.stem != HERE.stem and path.stem not in NOT_REST and not path.stem.endswith("_postgres"))

_origin: dict[str, str] = {}

try:
    from _pytest.fixtures import FixtureFunctionDefinition  # pytest >= 8.4

    def _is_fixture(value: object) -> bool:
        return isinstance(value, FixtureFunctionDefinition)
except ImportError:  # pytest 8.0-8.3 marks fixture functions with an attribute
    def _is_fixture(value: object) -> bool:
        return hasattr(value, "_pytestfixturefunction")


def _is_test(name: str, value: object, module: str) -> bool:
    """A test that `module` defines (not one it imported)."""
    if getattr(value, "__module__", None) != module:
        return False
    return (name.startswith("test_") and callable(value)) or (name.startswith("Test") and isinstance(value, type))


def _with_marks(value: object, marks: list) -> object:
    """The test carrying its module's `pytestmark` too (here it is no longer in that module); the original untouched."""
    if not marks:
        return value
    if isinstance(value, type):
        return type(value.__name__, (value,), {"pytestmark": list(marks), "__module__": value.__module__})
    clone = types.FunctionType(value.__code__, value.__globals__, value.__name__, value.__defaults__,
                               value.__closure__)
    clone.__kwdefaults__ = value.__kwdefaults__
    clone.__dict__.update(value.__dict__)
    clone.__qualname__, clone.__module__ = value.__qualname__, value.__module__
    clone.pytestmark = [*getattr(value, "pytestmark", []), *marks]
    return clone


for _module_name in REST_MODULES:
    try:
        _module = importlib.import_module(f"tests.api.{_module_name}")
    except ModuleNotFoundError as error:  # deleted or renamed since the glob; any other import error is reported
        if error.name == f"tests.api.{_module_name}":
            continue
        raise
    _marks = getattr(_module, "pytestmark", [])
    _marks = _marks if isinstance(_marks, list) else [_marks]
    for _name, _value in vars(_module).items():
        if _is_fixture(_value):  # defined there or imported there: its tests need it
            if _name in ("database_url", "postgres_server") or globals().get(_name) is _value:
                continue
            if _name in globals():
                raise RuntimeError(f"fixture {_name!r} of {_module_name} clashes with one of "
                                   f"{_origin.get(_name, __name__)}; rename one of them")
        elif not _is_test(_name, _value, _module.__name__):
            continue
        elif _name in globals():
            _name = (f"test_{_module_name[5:]}__{_name[5:]}" if _name.startswith("test_")
                     else f"Test{_module_name[5:].title().replace('_', '')}{_name[4:]}")
        if not _is_fixture(_value):
            _value = _with_marks(_value, _marks)
        _origin[_name] = _module_name
        globals()[_name] = _value


@pytest.fixture
def database_url(postgres_server):  # noqa: F811
    """A fresh PostgreSQL database for each test's server (instead of a SQLite file)."""
    return postgres_server.new_database()
