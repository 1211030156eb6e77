"""Building: reproducible digests, an SBOM per image, clear errors for packages that cannot be fetched and
registries that refuse a push (nothing half-pushed under the tag)."""

from __future__ import annotations

import subprocess

import pytest
from conftest import ref_of
from edgefleet_dev.images import build, debian, oci, sbom, wheels
from edgefleet_dev.images.spec import REPO


def test_two_builds_of_the_same_commit_give_the_same_digests(built, tmp_path, monkeypatch):
    monkeypatch.setenv("EDGEFLEET_IMAGE_REVISION", build.revision())
    source = tmp_path / "source"  # the commit itself: uncommitted edits in the checkout must not matter
    source.mkdir()
    subprocess.run(f"git -C {REPO} archive {build.revision()} pyproject.toml README.md operator runtime-image"
                   f" | tar -x -C {source}", shell=True, check=True)
    monkeypatch.setenv("EDGEFLEET_IMAGE_SOURCE", str(source))
    digests = []
    for cache in ("first", "second"):  # each from empty layer and image caches (downloads are shared)
        monkeypatch.setenv("EDGEFLEET_IMAGES_DIR", str(tmp_path / cache))
        digests.append({b.name: b.digest for b in build.build(["pause", "runtime-coral"], ["linux/amd64"],
                                                                 echo=print)})
    assert digests[0] == digests[1]
    assert all(d.startswith("sha256:") for d in digests[0].values())


def test_each_image_has_an_sbom_listing_its_packages(built, image_registry):
    for name, expect in (("runtime-cpu", {"onnxruntime", "numpy", "libc6", "python3.11-minimal"}),
                         ("runtime-openvino", {"openvino", "libstdc++6"})):
        doc = sbom.fetch(ref_of(built, image_registry, name))
        assert doc is not None, f"{name}: no SBOM referrer"
        assert doc["bomFormat"] == "CycloneDX"
        names = {c["name"].lower() for c in doc["components"]}
        assert expect <= names, f"{name}: SBOM lacks {expect - names}"


def test_a_package_that_cannot_be_fetched_is_named(tmp_path):
    apt = debian.Apt(build.downloads() / "apt", "amd64")
    missing = debian.Deb("libc6", "0.0-not-a-version", "amd64", "0" * 64)
    with pytest.raises(debian.PackageError, match=r"libc6=0\.0-not-a-version"):
        apt.fetch(missing, tmp_path)


def test_a_wheel_that_cannot_be_fetched_is_named(tmp_path):
    lock = tmp_path / "lock.txt"
    lock.write_text("numpy==0.0.1 --hash=sha256:" + "0" * 64 + "\n")
    with pytest.raises(wheels.WheelError, match="numpy"):
        wheels.install(lock, "amd64", tmp_path / "site", tmp_path / "pip")


def test_a_refused_push_names_the_image_and_leaves_no_tag(built, tmp_path):
    with oci.local_registry(tmp_path / "readonly", readonly=True) as refusing:
        with pytest.raises(oci.PushError, match=r"pushing pause to .* failed"):
            build.push(["pause"], f"{refusing}/edgefleet", insecure=True, echo=print)
        tags = subprocess.run([str(oci.components.binary_path("crane")), "ls", "--insecure",
                               f"{refusing}/edgefleet/pause"], capture_output=True, text=True)
        assert "0.1.0" not in tags.stdout


def test_push_copies_every_platform_and_prints_the_helm_line(built, tmp_path):
    with oci.local_registry(tmp_path / "target") as target:
        digests = build.push(["runtime-cpu"], f"{target}/ef", insecure=True, echo=print)
        assert digests == {"runtime-cpu": built["runtime-cpu"]["digest"]}
        index = oci.manifest(f"{target}/ef/runtime-cpu:0.1.0")
        platforms = {f"{m['platform']['os']}/{m['platform']['architecture']}" for m in index["manifests"]}
        assert platforms == set(built["runtime-cpu"]["platforms"])
        assert sbom.fetch(f"{target}/ef/runtime-cpu@{digests['runtime-cpu']}") is not None
        line = build.helm_set_line(f"{target}/ef", digests)
        assert f"--set images.registry={target}/ef" in line
        assert f"--set images.digests.runtime-cpu={digests['runtime-cpu']}" in line
