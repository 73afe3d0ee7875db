"""Intake checks that need no server: which dataset URIs a configuration allows."""

from __future__ import annotations

import pytest

from service.intake import allowed_dataset_uri

ROOTS = ["s3://bucket/calibration/", "gs://other/sets"]


@pytest.mark.parametrize("uri, allowed", [
    ("s3://bucket/calibration/digits.npz", True),
    ("gs://other/sets/a/b.npz", True),
    ("gs://other/sets", True),
    ("gs://other/sets-private/x.npz", False),  # a prefix is a folder, not a string prefix
    ("s3://bucket/calibration/../secrets/x.npz", False),
    ("s3://bucket/calibration/./x.npz", False),
    ("s3://bucket/other.npz", False),
    ("/etc/passwd", False),
    ("ds_123", False),
])
def test_remote_dataset_uris_must_lie_under_a_configured_root(uri: str, allowed: bool) -> None:
    assert allowed_dataset_uri(uri, ROOTS) is allowed


def test_no_roots_means_no_uris(tmp_path) -> None:
    assert not allowed_dataset_uri(str(tmp_path / "x.npz"), [])


def test_local_roots_resolve_dots_and_symlinks(tmp_path) -> None:
    root = tmp_path / "root"
    (root / "sub").mkdir(parents=True)
    (tmp_path / "outside.npz").write_bytes(b"x")
    (root / "link.npz").symlink_to(tmp_path / "outside.npz")
    assert allowed_dataset_uri(str(root / "sub" / "a.npz"), [str(root)])
    assert allowed_dataset_uri(f"file://{root}/sub/a.npz", [f"file://{root}"])
    assert not allowed_dataset_uri(str(root / "sub" / ".." / ".." / "outside.npz"), [str(root)])
    assert not allowed_dataset_uri(str(root / "link.npz"), [str(root)])
