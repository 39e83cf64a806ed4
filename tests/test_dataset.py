"""Loading, downloading, verifying and caching names.txt; every failure says what to do."""
import io
import urllib.error

import pytest

from data import dataset as dataset_module
from data.dataset import DATASET_ENV_VAR, DATASET_SHA256, DatasetError, load_dataset


@pytest.fixture
def names_bytes(dataset):
    with open(dataset.path, "rb") as handle:
        return handle.read()


def test_the_cached_copy_verifies(dataset):
    assert dataset.sha256 == DATASET_SHA256 and dataset.standard
    assert dataset.describe()["documents"] == 32033


def test_download_verifies_and_caches(tmp_path, monkeypatch, names_bytes):
    requested = []

    def fake_urlopen(url, timeout):
        requested.append(url)
        return io.BytesIO(names_bytes)
    monkeypatch.setattr(dataset_module.urllib.request, "urlopen", fake_urlopen)
    monkeypatch.delenv(DATASET_ENV_VAR, raising=False)
    cache = tmp_path / "cache" / "names.txt"
    loaded = load_dataset(cache_path=cache)
    assert requested == [dataset_module.DATASET_URL]
    assert cache.read_bytes() == names_bytes and loaded.standard
    load_dataset(cache_path=cache)  # second time: from the cache, no download
    assert len(requested) == 1


def test_download_with_a_wrong_checksum_caches_nothing(tmp_path, monkeypatch):
    monkeypatch.setattr(dataset_module.urllib.request, "urlopen",
                        lambda url, timeout: io.BytesIO(b"emma\nolivia\n"))
    monkeypatch.delenv(DATASET_ENV_VAR, raising=False)
    cache = tmp_path / "names.txt"
    with pytest.raises(DatasetError, match="nothing was cached"):
        load_dataset(cache_path=cache)
    assert not cache.exists()


def test_offline_without_a_cache_says_how_to_point_at_a_copy(tmp_path, monkeypatch):
    def offline(url, timeout):
        raise urllib.error.URLError("no network")
    monkeypatch.setattr(dataset_module.urllib.request, "urlopen", offline)
    monkeypatch.delenv(DATASET_ENV_VAR, raising=False)
    with pytest.raises(DatasetError) as error:
        load_dataset(cache_path=tmp_path / "names.txt")
    assert "--dataset" in str(error.value) and DATASET_ENV_VAR in str(error.value)


def test_truncated_file_is_refused(tmp_path, names_bytes):
    truncated = tmp_path / "names.txt"
    truncated.write_bytes(names_bytes[: len(names_bytes) // 2])
    with pytest.raises(DatasetError, match="sha256.*--custom-dataset"):
        load_dataset(truncated)


def test_corrupt_cache_says_to_delete_it(tmp_path, names_bytes):
    cache = tmp_path / "names.txt"
    cache.write_bytes(names_bytes.replace(b"emma", b"emmy", 1))
    with pytest.raises(DatasetError, match="delete"):
        load_dataset(cache_path=cache)


def test_custom_dataset_only_when_asked_and_marked(tmp_path):
    custom = tmp_path / "mine.txt"
    custom.write_text("ada\nbob\n\n  cy  \n")
    with pytest.raises(DatasetError):
        load_dataset(custom)
    loaded = load_dataset(custom, allow_custom=True)
    assert loaded.docs == ["ada", "bob", "cy"] and not loaded.standard
    assert loaded.describe()["standard"] is False


def test_environment_variable_points_at_a_copy(tmp_path, monkeypatch, names_bytes):
    copy = tmp_path / "copy.txt"
    copy.write_bytes(names_bytes)
    monkeypatch.setenv(DATASET_ENV_VAR, str(copy))
    assert load_dataset().path == str(copy)


def test_missing_and_empty_files(tmp_path):
    with pytest.raises(DatasetError, match="does not exist"):
        load_dataset(tmp_path / "absent.txt")
    empty = tmp_path / "empty.txt"
    empty.write_text("\n\n")
    with pytest.raises(DatasetError, match="no documents"):
        load_dataset(empty, allow_custom=True)


def test_atomic_writer_replaces_whole_files_and_leaves_no_temporary(tmp_path):
    """bench.files.write_atomically, which every cache and result file goes through."""
    from bench.files import write_atomically
    target = tmp_path / "new" / "cache.bin"
    write_atomically(target, b"\x00first")
    write_atomically(target, b"second")
    assert target.read_bytes() == b"second"
    write_atomically(target, "text")
    assert target.read_text() == "text" and (target.stat().st_mode & 0o777) == 0o644
    with pytest.raises(TypeError):
        write_atomically(target, None)
    assert target.read_text() == "text"
    assert [path.name for path in target.parent.iterdir()] == ["cache.bin"]
