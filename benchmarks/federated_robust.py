"""How far one bad client moves a federated run, per aggregation strategy, with and without the screening.

Three non-IID digits clients (tests/federated_helpers.py: each sees 6 of the 10 classes) fine-tune the digits
CNN's re-initialised head for 3 rounds x 5 epochs; a 4th client trains on client 0's shard and sends a bad
update. The rounds use `edgefleet_runtime.federated.robust` directly (no Flower, no network): the same
screen() and aggregate() the server runs. The baseline is FedAvg with the three honest clients alone, in the
same run; each cell is the held-out accuracy (tests/fixtures/models/digits_eval.npz) and its ratio to it.

    python benchmarks/federated_robust.py [--rounds 3] [--json PATH]
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import click

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

ATTACKS = {  # name -> (factor applied to the bad client's own update, samples it claims)
    "none": None,
    "30x update": (30.0, None),
    "-3x update, 10^6 samples": (-3.0, 10**6),
    "-2x update, 10^6 samples": (-2.0, 10**6),
}
STRATEGIES = ("FedAvg", "TrimmedMean", "Median")


def _run(model, shards, ex, ey, strategy: str, screened: bool, attack, rounds: int) -> tuple[float, int]:
    from edgefleet_runtime.federated import robust
    from edgefleet_runtime.federated.trainer import Head, loss_and_accuracy, train

    head, refused = model.head, 0
    for r in range(rounds):
        start = head.parameters()
        updates = [robust.Update(f"c{i}", train(head, x, y, seed=i).parameters(), len(y))
                   for i, (x, y) in enumerate(shards)]
        if attack is not None:
            factor, samples = attack
            own = train(head, *shards[0], seed=9).parameters()
            updates.append(robust.Update("bad", [s + factor * (p - s) for s, p in zip(start, own, strict=True)],
                                         samples or len(shards[0][1])))
        if screened:
            result = robust.screen(updates, start, robust.Limits(), r + 1)
            updates, refused = result.accepted, refused + len(result.refused)
        head = Head.of(robust.aggregate(strategy, updates))
    return loss_and_accuracy(head, ex, ey)[1], refused


@click.command()
@click.option("--rounds", default=3, show_default=True)
@click.option("--json", "json_path", type=click.Path(dir_okay=False), help="write the results here")
def main(rounds: int, json_path: str | None) -> None:
    from edgefleet_runtime.federated.trainer import HeadModel, loss_and_accuracy
    from federated_helpers import eval_data, fresh_head_model, noniid_shards

    model = HeadModel(fresh_head_model())
    shards = [(model.features({"input": x}), y) for x, y in noniid_shards()]
    x, ey = eval_data()
    ex = model.features({"input": x})
    start = loss_and_accuracy(model.head, ex, ey)[1]
    baseline, _ = _run(model, shards, ex, ey, "FedAvg", False, None, rounds)
    rows = []
    for name, attack in ATTACKS.items():
        for strategy in STRATEGIES:
            for screened in (False, True):
                acc, refused = _run(model, shards, ex, ey, strategy, screened, attack, rounds)
                rows.append({"attack": name, "strategy": strategy, "screened": screened, "accuracy": round(acc, 3),
                             "ratio": round(acc / baseline, 3), "refusedUpdates": refused})
    click.echo(f"start accuracy {start:.3f}; baseline (FedAvg, 3 honest clients) {baseline:.3f}; {rounds} rounds")
    click.echo(f"{'bad client':<26} {'strategy':<12} {'screened':<9} {'accuracy':>8} {'ratio':>6} {'refused':>7}")
    for r in rows:
        click.echo(f"{r['attack']:<26} {r['strategy']:<12} {str(r['screened']):<9} {r['accuracy']:>8.3f} "
                   f"{r['ratio']:>6.3f} {r['refusedUpdates']:>7}")
    if json_path:
        Path(json_path).write_text(json.dumps({"rounds": rounds, "startAccuracy": start, "baseline": baseline,
                                               "rows": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
