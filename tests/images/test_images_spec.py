"""What the builder builds agrees with the Dockerfiles, the locks, the chart and the built-in profiles."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import yaml
from edgefleet_dev.images import build, wheels
from edgefleet_dev.images.spec import DEFAULT_REGISTRY, IMAGES, REPO, VERSION

DOCKERFILE_IMAGES = [s for s in IMAGES.values() if s.dockerfile]


def _dockerfile(spec) -> str:
    text = (REPO / spec.dockerfile).read_text()
    return re.sub(r"\\\n", " ", text)


@pytest.mark.parametrize("spec", DOCKERFILE_IMAGES, ids=lambda s: s.name)
def test_dockerfile_installs_the_extras_the_builder_installs(spec):
    installs = re.findall(r"pip install [^\n]*?\"?\.\[([\w,-]+)\]\"?", _dockerfile(spec))
    assert installs, f"{spec.dockerfile}: no `pip install .[extras]` line"
    assert tuple(installs[-1].split(",")) == spec.extras, (
        f"{spec.dockerfile} installs [{installs[-1]}], `edgefleet images build` installs {list(spec.extras)}")


@pytest.mark.parametrize("spec", DOCKERFILE_IMAGES, ids=lambda s: s.name)
def test_dockerfile_sets_the_builder_environment_user_and_entrypoint(spec):
    text = _dockerfile(spec)
    for key, value in spec.env.items():
        assert re.search(rf"\b{key}={re.escape(value)}\b", text), f"{spec.dockerfile}: ENV {key}={value} missing"
    assert re.search(r"^USER 10001:10001$", text, re.M), f"{spec.dockerfile}: USER 10001:10001 missing"
    entry = re.findall(r"^ENTRYPOINT (\[.*\])$", text, re.M)
    assert entry and json.loads(entry[-1]) == list(spec.entrypoint)


@pytest.mark.parametrize("spec", [s for s in IMAGES.values() if s.python], ids=lambda s: s.name)
def test_every_platform_has_a_fresh_lock_covering_each_requirement(spec):
    for platform in spec.platforms:
        arch = build.arch_of(platform)
        path = build._read_wheel_lock(spec, arch)  # raises when missing or stale
        names = {n.lower().replace("_", "-") for n, _, _ in wheels.locked(path.read_text())}
        for req in wheels.requirements(spec):
            if ";" in req and "x86_64" in req and arch != "amd64":
                continue
            name = re.split(r"[<>=!~\[; ]", req, maxsplit=1)[0].lower().replace("_", "-")
            assert name in names, f"{path.name} lacks {name} (required by {spec.name})"
        debs = {ln.split("=")[0] for ln in build.deb_lock_path(arch).read_text().splitlines()}
        assert set(spec.debs) <= debs, f"{build.deb_lock_path(arch).name} lacks {set(spec.debs) - debs}"


def _named_images() -> list[str]:
    refs = []
    for profile in (REPO / "operator/edgefleet/profiles").glob("*.yaml"):
        refs.append(yaml.safe_load(profile.read_text())["spec"]["runtimeImage"])
    values = yaml.safe_load((REPO / "charts/edgefleet/values.yaml").read_text())
    refs.append(f"{values['images']['registry']}/{values['image']['name']}:{VERSION}")
    refs.append(f"{values['images']['registry']}/{values['compile']['image']['name']}:{VERSION}")
    return refs


def test_chart_and_profiles_name_only_images_a_build_produces():
    for ref in _named_images():
        registry, _, rest = ref.rpartition("/")
        name, _, tag = rest.partition(":")
        assert registry == DEFAULT_REGISTRY, f"{ref}: not under images.registry {DEFAULT_REGISTRY}"
        assert name in IMAGES, f"{ref}: no image named {name!r} is built by `edgefleet images build`"
        assert tag == VERSION, f"{ref}: tag {tag} is not the version the builder tags ({VERSION})"


def test_locks_are_part_of_the_package():
    assert "images/locks/*" in (REPO / "pyproject.toml").read_text()
    assert Path(build.LOCKS).is_dir()


@pytest.mark.parametrize("name", ["operator", "compiler", "trainer", "runtime-cpu"])
def test_product_images_carry_no_dev_cluster_or_image_builder_code(name):
    """The products' images hold the operator, compiler and runtime packages only: the tooling (dev cluster,
    image builder, demo) lives in tooling/edgefleet_dev and is never copied in."""
    files = [f.relative_to(REPO) for f, _ in build.shipped_files(IMAGES[name])]
    tops = {f.parts[:2] for f in files}
    assert ("runtime-image", "edgefleet_runtime") in tops
    assert tops <= {("runtime-image", "edgefleet_runtime"), ("operator", "edgefleet")}
    names = {part for f in files for part in f.parts}
    assert not names & {"devcluster", "images", "edgefleet_dev", "demo.py", "toolchain.py", "stack.py"}
    assert ("runtime-image", "edgefleet_runtime", "app.py") in {f.parts for f in files}
    if name != "runtime-cpu":
        assert any(f.parts[:3] == ("operator", "edgefleet", "reconcile") for f in files)
