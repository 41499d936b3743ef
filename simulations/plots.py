"""PNG plots of a run: block coverage, throughput and recoveries over virtual time.

matplotlib with the Agg backend (no display); scheduled faults are drawn as labelled lines.
"""

from __future__ import annotations

from pathlib import Path

from simulations.runner import RunResult


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _marks(ax, result: RunResult) -> None:
    for t, label in result.marks:
        ax.axvline(t / 60, color="red", linestyle="--", linewidth=0.8)
        ax.annotate(label, (t / 60, 1.0), xycoords=("data", "axes fraction"), rotation=90, fontsize=7,
                    va="top", ha="right", color="red")


def plot_coverage(result: RunResult, path: Path) -> Path:
    plt = _pyplot()
    minutes = [s.t / 60 for s in result.samples]
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(9, 6), sharex=True)
    top.plot(minutes, [s.live_nodes for s in result.samples], label="live nodes")
    top.plot(minutes, [s.min_replicas for s in result.samples], label="replicas of the least-served block")
    top.set_ylabel("hosts")
    top.legend(loc="lower left", fontsize=8)
    _marks(top, result)
    if result.samples:
        grid = [s.replicas for s in result.samples]
        image = bottom.imshow(list(zip(*grid)), aspect="auto", origin="lower", cmap="viridis", interpolation="nearest",
                              extent=(minutes[0], minutes[-1], 0, len(grid[0])))
        fig.colorbar(image, ax=bottom, label="replicas")
    bottom.set_ylabel("block")
    bottom.set_xlabel("virtual time (min)")
    fig.suptitle(f"{result.scenario.name} (seed {result.scenario.seed}): block coverage")
    return _save(plt, fig, path)


def plot_throughput(result: RunResult, path: Path) -> Path:
    plt = _pyplot()
    minutes = [s.t / 60 for s in result.samples]
    fig, ax = plt.subplots(figsize=(9, 4))
    ax.plot(minutes, [s.tokens_per_s for s in result.samples], label="tokens/s, all users")
    ax.set_ylabel("tokens/s")
    ax.set_xlabel("virtual time (min)")
    other = ax.twinx()
    other.plot(minutes, [s.in_flight for s in result.samples], color="gray", linewidth=0.8, label="sessions in flight")
    other.set_ylabel("sessions in flight")
    _marks(ax, result)
    ax.legend(loc="upper left", fontsize=8)
    other.legend(loc="upper right", fontsize=8)
    ax.set_title(f"{result.scenario.name} (seed {result.scenario.seed}): throughput")
    return _save(plt, fig, path)


def plot_recoveries(result: RunResult, path: Path) -> Path:
    plt = _pyplot()
    recoveries = [r for s in result.sessions for r in s.recoveries]
    failed = [s.started / 60 for s in result.sessions if s.outcome != "completed"]
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    left.scatter([r["at"] / 60 for r in recoveries], [r["seconds"] for r in recoveries], s=8, label="recovery")
    if failed:
        left.scatter(failed, [0] * len(failed), marker="x", color="red", s=16, label="session failed (start)")
    left.set_xlabel("virtual time (min)")
    left.set_ylabel("recovery time (s)")
    left.legend(fontsize=8)
    _marks(left, result)
    right.hist([r["seconds"] for r in recoveries] or [0], bins=30)
    right.set_xlabel("recovery time (s)")
    right.set_ylabel("recoveries")
    fig.suptitle(f"{result.scenario.name} (seed {result.scenario.seed}): {len(recoveries)} recoveries")
    return _save(plt, fig, path)


def _save(plt, fig, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return path


def write_plots(result: RunResult, out: Path) -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    return [plot_coverage(result, out / "coverage.png"), plot_throughput(result, out / "throughput.png"),
            plot_recoveries(result, out / "recoveries.png")]
