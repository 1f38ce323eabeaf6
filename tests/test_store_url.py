"""Store URLs of the form ``module.path:ClassName`` (store/__init__.py's ``resolve_store``)."""
from __future__ import annotations

import pytest

from flask_multiprocess_controller.exceptions import StoreError
from flask_multiprocess_controller.store import MemoryStore, SQLiteStore, resolve_store

import store_plugins


def test_a_class_alone_is_built_without_arguments() -> None:
    store = resolve_store("store_plugins:LabelledStore")
    assert type(store) is store_plugins.LabelledStore
    assert (store.url, store.label, store.options) == (None, "", {})
    store.close()


def test_options_become_keyword_arguments() -> None:
    store = resolve_store("store_plugins:LabelledStore?label=blue&size=3&empty=")
    assert isinstance(store, store_plugins.LabelledStore)
    assert (store.url, store.label, store.options) == (None, "blue", {"size": "3", "empty": ""})


def test_a_url_after_plus_is_the_one_argument_verbatim() -> None:
    store = resolve_store("store_plugins:LabelledStore+redis://user:pw@db:6379/2?ssl=1+x")
    assert isinstance(store, store_plugins.LabelledStore)
    assert (store.url, store.options) == ("redis://user:pw@db:6379/2?ssl=1+x", {})


def test_dotted_names_on_both_sides_of_the_colon() -> None:
    assert type(resolve_store("flask_multiprocess_controller.store.memory:MemoryStore")) is MemoryStore
    assert type(resolve_store("store_plugins:Outer.Inner")) is store_plugins.Outer.Inner


def test_the_environment_may_name_a_class(monkeypatch) -> None:
    monkeypatch.setenv("MPC_STORE_URL", "store_plugins:Strict")
    assert type(resolve_store(None)) is store_plugins.Strict


def test_the_known_schemes_are_unchanged(tmp_path) -> None:
    assert type(resolve_store("memory://")) is MemoryStore
    store = resolve_store("sqlite:///tasks.sqlite3", base_dir=str(tmp_path))
    assert isinstance(store, SQLiteStore) and store.path == str(tmp_path / "tasks.sqlite3")
    store.close()


@pytest.mark.parametrize("url, says", [
    ("store_plugins_missing:Store", "cannot be imported"),
    ("store_plugins:Missing", "does not have"),
    ("store_plugins:Outer.Missing", "does not have"),
    ("store_plugins:NotAStore", "not a subclass"),
    ("store_plugins:not_a_class", "not a subclass"),
    ("store_plugins:Strict?x=1", "could not build"),
    ("store_plugins:Strict+memory://", "could not build"),
    ("store_plugins:LabelledStore?label=a&label=b", "twice"),
    ("store plugins:Strict", "Unsupported store URL"),
    ("store_plugins:", "Unsupported store URL"),
])
def test_clear_errors(url: str, says: str) -> None:
    with pytest.raises(StoreError, match=says):
        resolve_store(url)
