"""A task folder can live anywhere: a path to the folder (its siblings import as a package), ``module:ATTR``,
a dotted module path; unknown names and folders without task.py are one-line errors."""

from __future__ import annotations

import sys

import pytest

from experiments.steps.common import split_task
from experiments.task import Task, get_task

TASK_PY = '''
import dataclasses

from tasks.general_addition.task import TASK as ADDITION
from {package}.settings_note import TITLE

TASK = dataclasses.replace(ADDITION, name="{package}", description=TITLE)
'''


def write_task_folder(root, package: str):
    folder = root / package
    folder.mkdir()
    (folder / "__init__.py").write_text("")
    (folder / "settings_note.py").write_text("TITLE = 'addition, declared outside the repository'\n")
    (folder / "task.py").write_text(TASK_PY.format(package=package))
    return folder


def test_a_task_folder_outside_the_repository_runs_by_path_and_by_module(tmp_path, monkeypatch):
    monkeypatch.setattr(sys, "path", list(sys.path))
    folder = write_task_folder(tmp_path, "outside_addition")
    task = get_task(str(folder))
    assert isinstance(task, Task) and task.name == "outside_addition"
    assert task.description == "addition, declared outside the repository"  # a sibling module imported
    assert get_task(str(folder / "task.py")) is task
    assert get_task("outside_addition.task:TASK") is task and get_task("outside_addition.task") is task
    chosen, rest = split_task(["--task", str(folder), "--test"], None)
    assert chosen is task and rest == ["--test"]


def test_unknown_tasks_are_one_line_errors(tmp_path):
    with pytest.raises(ValueError, match="holds no task.py"):
        get_task(str(tmp_path))
    with pytest.raises(ValueError, match="no module"):
        get_task("no_such_package.task:TASK")
    with pytest.raises(ValueError, match="unknown task 'nothing_here'"):
        get_task("nothing_here")
