"""Finding the system a command means, from where it is run: the per-user list of
systems that meshgate up keeps, the nearest meshgate.yaml, and the messages that
say how to name one when several fit."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from meshgate.runner import AmbiguousSystemError, NotRunningError, StateDir
from meshgate.runner.systems import find_system, known_systems, record_system, systems_folder


@pytest.fixture(autouse=True)
def state_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    home = tmp_path / "state-home"
    monkeypatch.setenv("XDG_STATE_HOME", str(home))
    return home


class Systems:
    """Systems in folders below ``tmp_path``, started (their lock held) or not."""

    def __init__(self, base: Path) -> None:
        self.base = base
        self.held: list[StateDir] = []

    def make(self, folder: str, name: str, root: str = ".", *, running: bool = True) -> Path:
        path = self.base / folder
        path.mkdir(parents=True, exist_ok=True)
        file = path / "meshgate.yaml"
        file.write_text(f"name: {name}\nroot: {root}\n")
        state = StateDir(path / ".meshgate")
        state.prepare()
        record_system(name, file, (path / root).resolve(), state.path)
        if running:
            state.acquire()
            self.held.append(state)
        return file

    def close(self) -> None:
        for state in self.held:
            state.release()


@pytest.fixture
def systems(tmp_path: Path) -> Iterator[Systems]:
    made = Systems(tmp_path)
    yield made
    made.close()


def test_the_list_lives_in_the_state_home(state_home: Path, tmp_path: Path) -> None:
    assert systems_folder() == state_home / "meshgate" / "systems"


def test_from_the_root_of_a_system_whose_file_is_below(systems: Systems, tmp_path: Path) -> None:
    # The README's case: meshgate up examples/shop/meshgate.yaml (root: ../..), then
    # meshgate ps from the repository root.
    file = systems.make("repo/examples/shop", "shop", root="../..")
    state, known = find_system(None, cwd=tmp_path / "repo")
    assert state.path == file.parent / ".meshgate"
    assert known is not None
    assert known.name == "shop"
    # And from a folder below the root that is not below the file.
    (tmp_path / "repo" / "src" / "pkg").mkdir(parents=True)
    assert find_system(None, cwd=tmp_path / "repo" / "src" / "pkg")[0].path == state.path


def test_the_nearest_file_above_wins_when_it_runs(systems: Systems, tmp_path: Path) -> None:
    systems.make("repo/examples/shop", "shop", root="../..")
    inner = systems.make("repo/examples/shop/sub", "sub")
    (inner.parent / "deeper").mkdir()
    assert find_system(None, cwd=inner.parent / "deeper")[0].path == inner.parent / ".meshgate"


def test_a_file_given_is_taken_as_is(systems: Systems, tmp_path: Path) -> None:
    systems.make("a", "a")
    state, known = find_system(tmp_path / "elsewhere" / "meshgate.yaml", cwd=tmp_path / "a")
    assert state.path == tmp_path / "elsewhere" / ".meshgate"
    assert known is None


def test_several_systems_here_say_how_to_name_each(systems: Systems, tmp_path: Path) -> None:
    systems.make("repo/one", "one", root="..")
    systems.make("repo/two", "two", root="..")
    with pytest.raises(AmbiguousSystemError) as caught:
        find_system(None, command="ps", cwd=tmp_path / "repo")
    message = str(caught.value)
    assert message.startswith(f"2 systems run from {tmp_path / 'repo'}; name one: ")
    assert "meshgate ps --system one or --file " in message
    assert "meshgate ps --system two or --file " in message
    assert find_system(None, "two", cwd=tmp_path / "repo")[0].path == (
        tmp_path / "repo" / "two" / ".meshgate"
    )


def test_the_only_running_system_is_found_from_anywhere(systems: Systems, tmp_path: Path) -> None:
    file = systems.make("somewhere", "solo")
    (tmp_path / "unrelated").mkdir()
    assert find_system(None, cwd=tmp_path / "unrelated")[0].path == file.parent / ".meshgate"
    # Unless it must be this folder's (backups): then this folder's own state.
    here, _ = find_system(None, running=False, anywhere=False, cwd=tmp_path / "unrelated")
    assert here.path == tmp_path / "unrelated" / ".meshgate"
    systems.make("other", "other")
    with pytest.raises(AmbiguousSystemError, match="2 systems run for this user"):
        find_system(None, cwd=tmp_path / "unrelated")


def test_nothing_running_means_the_file_of_this_folder(systems: Systems, tmp_path: Path) -> None:
    systems.make("stopped", "stopped", running=False)
    (tmp_path / "here").mkdir()
    state, _ = find_system(None, cwd=tmp_path / "here")
    assert state.path == tmp_path / "here" / ".meshgate"
    assert not state.running()


def test_logs_find_a_system_that_stopped(systems: Systems, tmp_path: Path) -> None:
    file = systems.make("repo/app", "app", root="..", running=False)
    state, _ = find_system(None, command="logs", running=False, cwd=tmp_path / "repo")
    assert state.path == file.parent / ".meshgate"
    # ps wants a running system: none runs, so it points at this folder's own.
    assert find_system(None, cwd=tmp_path / "repo")[0].path == tmp_path / "repo" / ".meshgate"


def test_an_unknown_name_lists_the_known(systems: Systems, tmp_path: Path) -> None:
    systems.make("a", "alpha")
    with pytest.raises(NotRunningError) as caught:
        find_system(None, "beta", cwd=tmp_path)
    assert "no system named 'beta' was run by meshgate up for this user; known: alpha (" in str(
        caught.value
    )


def test_systems_whose_state_is_gone_are_forgotten(systems: Systems, tmp_path: Path) -> None:
    file = systems.make("gone", "gone", running=False)
    assert [k.name for k in known_systems()] == ["gone"]
    for path in sorted((file.parent / ".meshgate").rglob("*"), reverse=True):
        path.rmdir() if path.is_dir() else path.unlink()
    (file.parent / ".meshgate").rmdir()
    assert known_systems() == []
    assert list(systems_folder().glob("*.json")) == []
