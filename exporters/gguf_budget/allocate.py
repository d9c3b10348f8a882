"""One type per tensor, minimizing the predicted divergence within a byte budget (a multiple-choice knapsack).

Each tensor offers (bytes, predicted cost) points, one per candidate type. The allocator starts every tensor
at its smallest type and takes upgrades in order of cost saved per byte spent, along each tensor's lower
convex hull (the classic greedy for the multiple-choice knapsack: optimal for the relaxed problem, and within
one upgrade of the optimum here, where no single tensor is a large share of the budget). Upgrades that no
longer fit are skipped, and a last pass spends what is left on the best single upgrade that still fits.
Ties break by tensor name and type, so the same inputs give the same mix.
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


def _hull(options: list[Option]) -> list[Option]:
    """The lower convex hull of (bytes, cost), from fewest bytes; dominated options removed."""
    best: dict[int, Option] = {}
    for opt in sorted(options, key=lambda o: (o.nbytes, o.cost, o.qtype)):
        best.setdefault(opt.nbytes, opt)
    points: list[Option] = []
    for opt in sorted(best.values(), key=lambda o: o.nbytes):
        if points and opt.cost >= points[-1].cost:
            continue  # more bytes, no less cost
        while len(points) >= 2:
            a, b = points[-2], points[-1]
            # b lies on or above the segment a -> opt: drop it
            if (b.cost - a.cost) * (opt.nbytes - a.nbytes) >= (opt.cost - a.cost) * (b.nbytes - a.nbytes):
                points.pop()
            else:
                break
        points.append(opt)
    return points


def smallest_bytes(choices: dict[str, list[Option]], fixed_bytes: int) -> int:
    return fixed_bytes + sum(min(o.nbytes for o in opts) for opts in choices.values())


def check_feasible(floor: int, budget: int, what: str) -> None:
    if budget < floor:
        raise MergeqError(
            f"{what}: a budget of {budget:,} bytes ({budget / 1e9:.3f} GB) cannot be met; the smallest "
            f"file the candidate types reach is {floor:,} bytes ({floor / 1e9:.3f} GB)",
            hint=f"ask for at least {floor:,} bytes, or allow smaller types",
        )


def allocate(
    choices: dict[str, list[Option]], fixed_bytes: int, budget: int, *, what: str = "--target-size"
) -> Allocation:
    """The mix of least predicted cost whose file is at most `budget` bytes; `what` names the option in errors."""
    floor = smallest_bytes(choices, fixed_bytes)
    check_feasible(floor, budget, what)
    hulls = {name: _hull(opts) for name, opts in sorted(choices.items())}
    current = {name: 0 for name in hulls}
    used = floor
    steps = []  # (-gain per byte, name, index of the hull point upgraded to)
    for name, hull in hulls.items():
        for i in range(1, len(hull)):
            gain = (hull[i - 1].cost - hull[i].cost) / max(1, hull[i].nbytes - hull[i - 1].nbytes)
            steps.append((-gain, name, i))
    steps.sort()
    for _, name, i in steps:
        hull = hulls[name]
        if current[name] != i - 1:
            continue  # an earlier point of this hull was skipped: the later ones stay out of order
        extra = hull[i].nbytes - hull[i - 1].nbytes
        if used + extra <= budget:
            current[name] = i
            used += extra
    chosen = {name: hulls[name][i] for name, i in current.items()}
    # spend what is left: the single change (any option, hull or not) that saves the most cost and fits
    while True:
        best = None
        for name in sorted(choices):
            now = chosen[name]
            for opt in choices[name]:
                extra = opt.nbytes - now.nbytes
                if opt.cost < now.cost and used + extra <= budget:
                    key = (now.cost - opt.cost, -extra)
                    if best is None or key > best[0]:
                        best = (key, name, opt)
        if best is None:
            break
        _, name, opt = best
        used += opt.nbytes - chosen[name].nbytes
        chosen[name] = opt
    return Allocation({n: o.qtype for n, o in sorted(chosen.items())}, used, sum(o.cost for o in chosen.values()))
