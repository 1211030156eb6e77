"""The built-in profiles take their runtime images from one registry prefix, pinned by digest where given."""

from edgefleet.api import builtin_profiles


def test_profiles_follow_the_image_registry_and_digests():
    digest = "sha256:" + "cd" * 32
    profiles = {p.metadata["name"]: p for p in builtin_profiles("reg.local:5000/ef", {"runtime-cpu": digest})}
    assert profiles["cpu-amd64"].spec.runtime_image == f"reg.local:5000/ef/runtime-cpu@{digest}"
    assert profiles["cpu-arm64"].spec.runtime_image == f"reg.local:5000/ef/runtime-cpu@{digest}"
    assert profiles["intel-openvino"].spec.runtime_image == "reg.local:5000/ef/runtime-openvino:0.1.0"


def test_default_registry_is_what_the_profile_files_name():
    for p in builtin_profiles():
        assert p.spec.runtime_image.startswith("ghcr.io/edgefleet/runtime-")
