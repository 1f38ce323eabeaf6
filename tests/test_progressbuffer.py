"""The progress buffer a task process writes and its serving process reads (see engine.progressbuffer)."""
from __future__ import annotations

import os

import pytest

from flask_multiprocess_controller.engine.progressbuffer import ProgressBuffer, open_reader

pytestmark = pytest.mark.timeout(30)

UUID = "0f8fad5b-d9cb-469f-a165-70867728950e"


@pytest.fixture
def buffer():
    made = ProgressBuffer()
    yield made
    made.close()


def test_a_reader_sees_each_new_value_once(buffer: ProgressBuffer) -> None:
    reader = open_reader(os.getpid(), buffer.fd)
    assert reader is not None
    try:
        assert reader.read(UUID) == (False, None)  # nothing written yet
        buffer.write(UUID, '{"step": 1}')
        assert reader.read(UUID) == (True, {"step": 1})
        assert reader.read(UUID) == (False, None)
        buffer.write(UUID, '"a longer value than the first, and then a shorter one"')
        buffer.write(UUID, "2")
        assert reader.read(UUID) == (True, 2)  # the latest wins; the longer one's tail is not read
        big = "[" + ",".join(["1"] * 5000) + "]"  # past the first read's size
        buffer.write(UUID, big)
        assert reader.read(UUID) == (True, [1] * 5000)
    finally:
        reader.close()


def test_an_earlier_task_s_record_and_a_half_written_one_are_not_taken(buffer: ProgressBuffer) -> None:
    reader = open_reader(os.getpid(), buffer.fd)
    assert reader is not None
    try:
        buffer.write("an-earlier-task", "41")
        assert reader.read(UUID) == (False, None)
        buffer.write(UUID, "42")
        header = os.pread(buffer.fd, 64, 0)
        os.pwrite(buffer.fd, b"7", len(header) - len(b"42"))  # as if read while the text was being written
        assert reader.read(UUID) == (False, None)
        buffer.write(UUID, "43")
        assert reader.read(UUID) == (True, 43)
    finally:
        reader.close()


def test_only_a_progress_buffer_is_opened(tmp_path) -> None:
    fd = os.open(tmp_path / "not-a-buffer", os.O_RDWR | os.O_CREAT)
    try:
        assert open_reader(os.getpid(), fd) is None
        assert open_reader(os.getpid(), 9999) is None  # no such descriptor
    finally:
        os.close(fd)
