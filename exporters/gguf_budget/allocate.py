"""One type per tensor, minimizing the predicted divergence within a byte budget (a multiple-choice knapsack).

Each tensor offers (bytes, predicted cost) points, one per candidate type. The knapsack is solved exactly by
dynamic programming over the budget in units of UNIT_STEPS-th parts of the bytes there are to share out: each
option's bytes round up to whole units, so the chosen mix always fits, and the rounding gives away at most one
unit per tensor (on the demo model, 211 tensors x 0.4 KB of a 105 MB budget). A last pass spends what is left
on the single change that saves the most cost and still fits, until none does. Ties break by tensor name and
type order, so the same inputs give the same mix.

The classic greedy (upgrades along each tensor's lower convex hull, by cost saved per byte) is optimal only
for the relaxed problem: a tensor as large as the demo's token embedding (a quarter of its bytes, whose next
type is 8 MB away) leaves it short of the optimum by whatever that upgrade would have bought.
"""

from __future__ import annotations

from dataclasses import dataclass

from mergeq.core.errors import MergeqError


@dataclass(frozen=True)
class Option:
    qtype: str
    nbytes: int
    cost: float


@dataclass
class Allocation:
    types: dict[str, str]  # tensor -> chosen type
    nbytes: int  # the whole file, fixed bytes included
    cost: float  # predicted divergence, summed over tensors


def smallest_bytes(choices: dict[str, list[Option]], fixed_bytes: int) -> int:
    return fixed_bytes + sum(min(o.nbytes for o in opts) for opts in choices.values())


def check_feasible(floor: int, budget: int, what: str) -> None:
    if budget < floor:
        raise MergeqError(
            f"{what}: a budget of {budget:,} bytes ({budget / 1e9:.3f} GB) cannot be met; the smallest "
            f"file the candidate types reach is {floor:,} bytes ({floor / 1e9:.3f} GB)",
            hint=f"ask for at least {floor:,} bytes, or allow smaller types",
        )


UNIT_STEPS = 1 << 17  # the budget's units: its free bytes in about 131,000 steps (memory: tensors x steps bytes)


def allocate(
    choices: dict[str, list[Option]], fixed_bytes: int, budget: int, *, what: str = "--target-size"
) -> Allocation:
    """The mix of least predicted cost whose file is at most `budget` bytes; `what` names the option in errors."""
    import numpy as np

    floor = smallest_bytes(choices, fixed_bytes)
    check_feasible(floor, budget, what)
    names = sorted(choices)
    options = {n: sorted(choices[n], key=lambda o: (o.nbytes, o.cost, o.qtype)) for n in names}
    base = {n: options[n][0].nbytes for n in names}  # every tensor's smallest option
    free = budget - floor  # bytes to share out above the smallest mix
    unit = max(1, -(-free // UNIT_STEPS))
    steps = free // unit
    best = np.zeros(steps + 1)  # least cost of the tensors so far within each number of units
    picks = np.zeros((len(names), steps + 1), dtype=np.int8)  # index of each tensor's option
    for i, name in enumerate(names):
        nxt = np.full(steps + 1, np.inf)
        for k, opt in enumerate(options[name]):
            extra = -(-(opt.nbytes - base[name]) // unit)
            if extra > steps:
                continue
            cand = np.full(steps + 1, np.inf)
            cand[extra:] = best[: steps + 1 - extra] + opt.cost
            better = cand < nxt
            nxt[better] = cand[better]
            picks[i, better] = k
        best = nxt
    left = int(np.argmin(best))  # the fewest units that reach the least cost
    chosen: dict[str, Option] = {}
    for i in range(len(names) - 1, -1, -1):
        opt = options[names[i]][int(picks[i, left])]
        chosen[names[i]] = opt
        left -= -(-(opt.nbytes - base[names[i]]) // unit)
    used = fixed_bytes + sum(o.nbytes for o in chosen.values())
    # spend what the rounding left: the single change (any option) that saves the most cost and fits
    while True:
        found = None
        for name in names:
            now = chosen[name]
            for opt in options[name]:
                extra = opt.nbytes - now.nbytes
                if opt.cost < now.cost and used + extra <= budget:
                    key = (now.cost - opt.cost, -extra)
                    if found is None or key > found[0]:
                        found = (key, name, opt)
        if found is None:
            break
        _, name, opt = found
        used += opt.nbytes - chosen[name].nbytes
        chosen[name] = opt
    return Allocation({n: o.qtype for n, o in sorted(chosen.items())}, used, sum(o.cost for o in chosen.values()))
