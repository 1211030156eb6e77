"""`edgefleet examples pull`: the hard examples the fleet uploaded (edgefleet_runtime.feedback) as one .npz.

A ref names one batch (oci://HOST[:PORT]/REPO:TAG or @sha256:...) or a repository (oci://HOST[:PORT]/REPO: every
tag in it, i.e. every batch). The .npz holds, for N examples in upload order:

- ``<input name>``: the inputs, stacked on the first axis: usable as calibration data as it is (keys are the
  model's input names, as `spec.optimization.calibration` expects)
- ``output.<name>``: the model's outputs; ``predicted``: its top-1 class; ``confidence``: its top-1 probability
- ``model``, ``model_digest``, ``class``, ``node``: where each example came from (strings)
- ``time``: when it was spooled (Unix seconds)

There is no ``y``: label the examples (e.g. ``numpy.savez(path, **data, y=labels)``) before retraining or
evaluating on them.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import click
import numpy as np
from edgefleet_runtime.monitor import read_example

from .store import StoreError, parse_oci

EXAMPLE_MEDIA_TYPE = "application/vnd.edgefleet.hard-example.v1+npz"  # as edgefleet_runtime.feedback pushes
ANNOTATION = "io.edgefleet.hard-examples."


OPERATION_SECONDS = 120.0


def _client(registry: str, insecure: bool):
    """The project's registry client (timeouts, bounded retries, one plain-HTTP rule) for one operation."""
    from edgefleet_runtime.fetch import registry_for

    return registry_for(registry, insecure, OPERATION_SECONDS)


def batch_refs(ref: str, insecure: bool = False) -> list[str]:
    """The batches ``ref`` names: itself when it has a tag or digest, else every tag of the repository."""
    registry, repository, suffix = parse_oci(ref)
    if suffix:
        return [f"{registry}/{repository}{suffix}"]
    try:
        tags = _client(registry, insecure).get_tags(f"{registry}/{repository}")
    except Exception as e:  # requests / oras errors
        raise StoreError(f"cannot list the batches in {ref}: {e}") from e
    return [f"{registry}/{repository}:{t}" for t in sorted(tags)]


def pull_batch(target: str, insecure: bool = False) -> list[dict]:
    """The examples of one batch: dicts of inputs, outputs and meta (with the batch's class and node)."""
    registry = target.split("/", 1)[0]
    client = _client(registry, insecure)
    try:
        manifest = client.get_manifest(target)
    except Exception as e:
        raise StoreError(f"cannot read {target}: {e}") from e
    annotations = manifest.get("annotations") or {}
    if not any(k.startswith(ANNOTATION) for k in annotations):
        raise StoreError(f"{target} is not a hard-example batch (no {ANNOTATION}* annotations)")
    origin = {k[len(ANNOTATION):]: v for k, v in annotations.items() if k.startswith(ANNOTATION)}
    out = []
    with tempfile.TemporaryDirectory() as tmp:
        try:
            files = client.pull(target=target, outdir=tmp)
        except Exception as e:
            raise StoreError(f"pull of {target} failed: {e}") from e
        for f in sorted(Path(p) for p in files if Path(p).suffix == ".npz"):
            inputs, outputs, meta = read_example(f)
            out.append({"inputs": inputs, "outputs": outputs,
                        "meta": {**meta, "class": origin.get("class", ""), "node": origin.get("node", "")}})
    if len(out) != int(origin.get("count", len(out))):
        raise StoreError(f"{target}: {len(out)} examples, its annotation says {origin.get('count')}")
    return out


def to_arrays(examples: list[dict]) -> dict[str, np.ndarray]:
    """Stack examples into the arrays of the .npz (ValueError when their shapes differ)."""
    if not examples:
        return {}
    arrays: dict[str, np.ndarray] = {}
    for key, part in (("", "inputs"), ("output.", "outputs")):
        for name in examples[0][part]:
            try:
                arrays[key + name] = np.concatenate([e[part][name] for e in examples], axis=0)
            except ValueError as e:
                raise ValueError(f"{part} {name!r} differ in shape between examples ({e}); pull one batch at a time"
                                 ) from e
    metas = [e["meta"] for e in examples]
    first_out = next(iter(examples[0]["outputs"]), None)
    if first_out is not None:
        arrays["predicted"] = arrays["output." + first_out].reshape(len(examples), -1).argmax(1)
    arrays["confidence"] = np.array([m.get("confidence", np.nan) for m in metas], np.float64)
    arrays["time"] = np.array([m.get("time", np.nan) for m in metas], np.float64)
    for key, field in (("model", "model"), ("model_digest", "digest"), ("class", "class"), ("node", "node")):
        arrays[key] = np.array([str(m.get(field, "")) for m in metas])
    return arrays


def pull(ref: str, out: str | Path, insecure: bool = False) -> dict[str, np.ndarray]:
    """Every example ``ref`` names, written to ``out`` (.npz); the arrays."""
    examples = []
    for target in batch_refs(ref, insecure):
        examples += pull_batch(target, insecure)
    examples.sort(key=lambda e: e["meta"].get("time", 0))
    arrays = to_arrays(examples)
    np.savez(out, **arrays)  # type: ignore[arg-type]  # numpy stubs: kwargs are arrays
    return arrays


@click.group("examples")
def examples() -> None:
    """Hard examples uploaded by the fleet (EdgeDeployment spec.feedback.hardExamples)."""


@examples.command("pull")
@click.argument("ref")
@click.option("-o", "--out", required=True, type=click.Path(dir_okay=False), help="the .npz to write")
@click.option("--insecure", is_flag=True, help="plain http to the registry (loopback registries need no flag)")
def pull_command(ref: str, out: str, insecure: bool) -> None:
    """Fetch the hard examples under REF (oci://HOST/REPO for every batch, or one batch's :TAG) as one .npz."""
    try:
        arrays = pull(ref, out, insecure)
    except (StoreError, ValueError) as e:
        raise click.ClickException(str(e)) from e
    n = len(arrays.get("confidence", []))
    classes = sorted(set(arrays["class"].tolist())) if n else []
    click.echo(json.dumps({"examples": n, "out": out, "classes": classes}))
