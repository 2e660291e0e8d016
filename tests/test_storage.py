"""segcore.storage against a real S3 server (SeaweedFS on loopback): URIs, key safety, verified and
cached downloads, multipart uploads, outputs uploaded only on success, one-line errors."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import pytest

from segcore import storage
from segcore.cli import main
from segcore.errors import SegcoreError

# ---------------------------------------------------------------------------------- URIs and keys


def test_parse_s3_uri():
    assert storage.parse_s3_uri("s3://my-bucket/a/b/") == storage.S3Uri("my-bucket", "a/b/")
    assert storage.parse_s3_uri("s3://my.bucket") == storage.S3Uri("my.bucket", "")
    assert storage.parse_s3_uri("S3://bkt/x").key == "x"
    assert str(storage.parse_s3_uri("s3://bkt/a/").child("m.json")) == "s3://bkt/a/m.json"
    assert storage.is_s3("s3://b/x") and storage.is_s3("s3:/typo") and not storage.is_s3("data/s3")
    for bad, why in [
        ("s3:/bkt/x", "expected s3://BUCKET/PREFIX"),
        ("s3://", "no bucket"),
        ("s3:///x", "no bucket"),
        ("s3://Bad_Bucket/x", "not a valid bucket name"),
        ("s3://ab/x", "not a valid bucket name"),
        ("s3://bkt/a/../b", "'..'"),
        ("s3://bkt/a//b", "empty"),
    ]:
        with pytest.raises(SegcoreError, match=why):
            storage.parse_s3_uri(bad)


@pytest.mark.parametrize("key", ["p/../evil", "p/a/../../evil", "p//abs", "p/./x", "p/", "p/a\\..\\x"])
def test_keys_that_would_escape_the_target_are_refused(key, tmp_path):
    with pytest.raises(SegcoreError, match="outside the target folder"):
        storage.safe_relative(key, "p/")
    # and nothing is downloaded for a listing that holds one (checked before any request)
    objects = [storage.S3Object("p/ok.png", 3, "x"), storage.S3Object(key, 3, "x")]
    with pytest.raises(SegcoreError, match="refusing S3 key"):
        storage._fetch(objects, "bkt", "p/", tmp_path / "root", {})
    assert not (tmp_path / "root").exists() and not (tmp_path / "evil").exists()
    assert storage.safe_relative("p/a/b.png", "p/") == "a/b.png"


def test_download_checks_size_and_md5(tmp_path):
    f = tmp_path / "x.bin"
    f.write_bytes(b"hello")
    md5 = "5d41402abc4b2a76b9719d911017c592"
    uri = storage.S3Uri("bkt", "x.bin")
    storage._verify(f, storage.S3Object("x.bin", 5, md5), uri)
    with pytest.raises(SegcoreError, match="incomplete transfer"):
        storage._verify(f, storage.S3Object("x.bin", 6, md5), uri)
    # a multipart ETag of another part size cannot be recomputed: the size is what is checked
    storage._verify(f, storage.S3Object("x.bin", 5, "0" * 32 + "-3"), uri)


# ---------------------------------------------------------------------------------- real server


def _tree(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_upload_download_cache_and_multipart(s3_env, tmp_path, caplog):
    src = tmp_path / "src"
    (src / "images" / "train").mkdir(parents=True)
    for i in range(3):
        (src / "images" / "train" / f"{i}.png").write_bytes(os.urandom(1000 + i))
    (src / "big.bin").write_bytes(os.urandom(storage.PART_SIZE + 1_000_000))  # two parts
    (src / "manifest.json").write_text("{}")
    (src / ".hidden.tmp").write_text("temporary file of an atomic write: never uploaded")
    uri = f"s3://{s3_env.bucket}/t-cache/data"

    assert storage.sync_up(src, uri) == 5
    assert storage.sync_up(src, uri) == 0  # unchanged: nothing sent again
    head = s3_env.client().head_object(Bucket=s3_env.bucket, Key="t-cache/data/big.bin")
    assert head["ETag"].strip('"').endswith("-2")  # really multipart
    assert ".hidden.tmp" not in "".join(s3_env.keys("t-cache/"))

    caplog.set_level(logging.INFO, logger="segcore.storage")
    local = storage.local_input(uri)
    assert local.is_relative_to(Path(os.environ["SEGCORE_CACHE"]))
    expected = {k: v for k, v in _tree(src).items() if k != ".hidden.tmp"}
    assert _tree(local) == expected
    assert "5 files downloaded, 0 from the cache" in caplog.text
    caplog.clear()
    assert storage.local_input(uri) == local
    assert "0 files downloaded, 5 from the cache" in caplog.text  # second run: nothing downloaded

    # a changed object is downloaded again, a deleted one leaves the cache
    c = s3_env.client()
    c.put_object(Bucket=s3_env.bucket, Key="t-cache/data/images/train/0.png", Body=b"new")
    c.delete_object(Bucket=s3_env.bucket, Key="t-cache/data/images/train/1.png")
    caplog.clear()
    storage.local_input(uri)
    assert "1 files downloaded, 3 from the cache" in caplog.text
    assert (local / "images/train/0.png").read_bytes() == b"new"
    assert not (local / "images/train/1.png").exists()

    # a single object, and a missing one
    single = storage.local_input(f"{uri}/manifest.json")
    assert single.is_file() and single.read_text() == "{}"
    with pytest.raises(SegcoreError, match="no object or folder"):
        storage.local_input(f"s3://{s3_env.bucket}/t-cache/nothing-here")


def test_local_output_uploads_only_on_success_and_finished_markers_last(s3_env, monkeypatch):
    uri = f"s3://{s3_env.bucket}/t-output/run"
    with pytest.raises(RuntimeError):
        with storage.local_output(uri) as out:
            out.mkdir()
            (out / "model.json").write_text("{}")
            raise RuntimeError("the step failed")
    assert s3_env.keys("t-output/") == []  # nothing that looks finished

    order = []
    upload = storage._upload_one
    monkeypatch.setattr(storage, "_upload_one", lambda path, target: (order.append(target.key), upload(path, target)))
    with storage.local_output(uri) as out:
        (out / "sub").mkdir(parents=True)
        for name in ("model.json", "best.pt", "metrics.jsonl", "last.pt", "sub/a.png"):
            (out / name).write_text(name)
    assert order[-3:] == ["t-output/run/last.pt", "t-output/run/metrics.jsonl", "t-output/run/model.json"]
    names = ("model.json", "best.pt", "metrics.jsonl", "last.pt", "sub/a.png")
    assert sorted(s3_env.keys("t-output/")) == sorted(f"t-output/run/{n}" for n in names)

    with pytest.raises(SegcoreError, match="already exists"):
        with storage.local_output(uri):
            pass
    with storage.local_output(uri, overwrite=True) as out:  # replaces: stale objects go
        out.mkdir()
        (out / "model.json").write_text("v2")
    assert s3_env.keys("t-output/") == ["t-output/run/model.json"]


# ---------------------------------------------------------------------------------- bad input, one line, exit 2


def _one_line_error(capsys, command: str) -> str:
    err = capsys.readouterr().err.strip()
    lines = [line for line in err.splitlines() if line.startswith(f"segcore {command}: error:")]
    assert len(lines) == 1, err
    return lines[0]


def test_bad_s3_input_is_a_one_line_error(s3_env, tmp_path, capsys, monkeypatch):
    bucket = s3_env.bucket
    out = str(tmp_path / "out")
    assert main(["convert", "--train-data-root", "s3:/typo/raw", "--output", out]) == 2
    assert "malformed S3 URI 's3:/typo/raw'" in _one_line_error(capsys, "convert")

    assert main(["convert", "--train-data-root", "s3://no-such-bucket-x/raw", "--output", out]) == 2
    assert "bucket 'no-such-bucket-x' does not exist" in _one_line_error(capsys, "convert")

    assert main(["demo-data", "--output", f"s3://{bucket}/t-bad/../x"]) == 2
    assert "'..'" in _one_line_error(capsys, "demo-data")

    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "wrong-secret-value-123")
    storage.reset_client()
    assert main(["convert", "--train-data-root", f"s3://{bucket}/raw", "--output", out]) == 2
    line = _one_line_error(capsys, "convert")
    assert "rejected the credentials" in line and "AWS_SECRET_ACCESS_KEY" in line
    assert "wrong-secret-value-123" not in line

    monkeypatch.delenv("AWS_ACCESS_KEY_ID")
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY")
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    storage.reset_client()
    assert main(["demo-data", "--output", f"s3://{bucket}/t-bad/y"]) == 2
    assert "no S3 credentials found" in _one_line_error(capsys, "demo-data")

    monkeypatch.setenv("AWS_ACCESS_KEY_ID", s3_env.access_key)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", s3_env.secret_key)
    from servers import free_ports

    closed = f"http://127.0.0.1:{free_ports(1)[0]}"
    assert main(["convert", "--train-data-root", f"s3://{bucket}/raw", "--output", out, "--s3-endpoint", closed]) == 2
    assert f"cannot reach the S3 endpoint {closed}" in _one_line_error(capsys, "convert")
    assert not Path(out).exists()
