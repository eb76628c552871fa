"""fileio's path layer: local paths and file:// URLs take one code path;
other URLs are refused, in one line, where a POSIX file system is needed."""

from __future__ import annotations

import json
import os

import pytest

from dro_fast import fileio


def test_require_local_accepts_paths_and_file_urls(tmp_path):
  assert fileio.require_local("runs/demo", "--workdir") == "runs/demo"
  assert fileio.require_local(tmp_path, "--workdir") == str(tmp_path)
  assert fileio.require_local(f"file://{tmp_path}", "--workdir") == str(
      tmp_path)
  assert fileio.require_local("file://localhost/a/b", "--workdir") == "/a/b"


@pytest.mark.parametrize("url", ["gs://bucket/runs/xl", "s3://bucket/run",
                                 "file://otherhost/a"])
def test_require_local_refuses_other_urls_in_one_line(url):
  with pytest.raises(ValueError) as error:
    fileio.require_local(url, "--workdir")
  message = str(error.value)
  assert "\n" not in message
  assert message.startswith(f"{url}: a file:// URL naming the host" if
                            url.startswith("file") else
                            f"--workdir: {url} is a {url[:2]}:// URL")
  assert "local path" in message


def test_atomic_write_refuses_urls_and_writes_nothing(tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)
  with pytest.raises(ValueError, match="gs://bucket/x.json is a gs:// URL"):
    fileio.atomic_write_json("gs://bucket/x.json", {"a": 1})
  assert not os.listdir(tmp_path)          # no local "gs:" directory
  fileio.atomic_write_json(f"file://{tmp_path}/x.json", {"a": 1})
  assert json.loads((tmp_path / "x.json").read_text()) == {"a": 1}


def test_as_path_and_absolute(tmp_path):
  assert fileio.as_path(f"file://{tmp_path}") == fileio.as_path(tmp_path)
  assert fileio.as_path(f"file://{tmp_path}").is_dir()
  assert str(fileio.as_path("gs://bucket/a") / "b") == "gs://bucket/a/b"
  assert fileio.url_scheme("GS://bucket") == "gs"
  assert fileio.url_scheme("/a/b:c") is None
  assert fileio.absolute("gs://bucket/a") == "gs://bucket/a"
  assert fileio.absolute("file:///a/b") == "/a/b"
  assert fileio.absolute("rel") == os.path.abspath("rel")
  assert fileio.absolute(None) is None
  assert fileio.absolute("") == ""
