"""What a run says: `report.json` (sessions, throughput, recoveries, coverage, spot checks, NAT
traversal, invariants, trace hash) and the summary table printed at the end. Percentiles interpolate linearly
between ranks.
"""

from __future__ import annotations

import json
import math
from collections import Counter, defaultdict
from collections.abc import Sequence
from pathlib import Path

from simulations.compute import describe
from simulations.progress import format_duration
from simulations.runner import RunResult
from simulations.stats import percentile, session_summary
from simulations.users import SessionRecord


def _round(value: float | None, digits: int = 3) -> float | None:
    return None if value is None else round(value, digits)


def recovery_kind(reason: str) -> str:
    text = reason.lower()
    for needle, kind in (("timed out", "timeout"), ("no session within", "timeout"), ("shutting down", "drained"),
                         ("evicted", "evicted"), ("reset", "reset"), ("closed", "reset"), ("unreachable", "unreachable"),
                         ("idle", "expired"), ("slots", "overloaded"), ("kv cache", "cache full")):
        if needle in text:
            return kind
    return "other"


def throughput_summary(sessions: Sequence[SessionRecord]) -> dict:
    per_user: dict[str, list[float]] = defaultdict(lambda: [0.0, 0.0])
    per_session = []
    for s in sessions:
        if s.outcome == "completed" and s.prefill_s + s.decode_s > 0:
            per_user[s.user][0] += s.tokens
            per_user[s.user][1] += s.prefill_s + s.decode_s
            per_session.append(s.tokens_per_s)
    users = [tokens / seconds for tokens, seconds in per_user.values()]
    return {"clients": len(users), "p5": _round(percentile(users, 5)), "p50": _round(percentile(users, 50)),
            "p95": _round(percentile(users, 95)),
            "per_session": {"p5": _round(percentile(per_session, 5)), "p50": _round(percentile(per_session, 50)),
                            "p95": _round(percentile(per_session, 95))}}


def decode_summary(sessions: Sequence[SessionRecord]) -> dict:
    """Decode speed of completed sessions: tokens after the first over decode time, in all
    (`tokens_per_s`) and per session; and what speculation did (`[clients] speculative`): drafts
    sent and kept, and decode passes per decoded token (1 without speculation)."""
    done = [s for s in sessions if s.outcome == "completed" and s.decode_s > 0 and s.tokens > 1]
    decoded, seconds = sum(s.tokens - 1 for s in done), sum(s.decode_s for s in done)
    per_session = [s.decode_tokens_per_s for s in done]
    drafted, accepted, passes = (sum(s.drafted for s in done), sum(s.accepted for s in done),
                                 sum(s.passes for s in done))
    return {"sessions": len(done), "tokens": decoded, "seconds": _round(seconds),
            "tokens_per_s": _round(decoded / seconds) if seconds > 0 else None,
            "per_session": {"p5": _round(percentile(per_session, 5)), "p50": _round(percentile(per_session, 50)),
                            "p95": _round(percentile(per_session, 95))},
            "speculation": {"passes": passes, "drafted": drafted, "accepted": accepted,
                            "acceptance": _round(accepted / drafted, 4) if drafted else None,
                            "passes_per_token": _round(passes / decoded, 4) if passes and decoded else None}}


def speculation_gain(on: RunResult, off: RunResult, *, scenario_arg: str = "") -> dict:
    """The same scenario and seed with speculation (`on`) and without (`off`): decode tokens/s of
    each (`decode_summary`), their ratio (`ratio_paired`: over the sessions both runs completed, each
    user's n-th request: the same prompt in both), and whether those produced the same tokens."""
    with_drafts, without = decode_summary(on.sessions), decode_summary(off.sessions)

    def ratio(a: float | None, b: float | None) -> float | None:
        return None if a is None or not b else round(a / b, 3)

    def by_user(result: RunResult) -> dict[tuple[str, int], SessionRecord]:
        counts: Counter = Counter()
        keyed = {}
        for s in sorted(result.sessions, key=lambda x: x.started):
            keyed[(s.user, counts[s.user])] = s
            counts[s.user] += 1
        return keyed

    a, b = by_user(on), by_user(off)
    both = [k for k in a if k in b and a[k].outcome == b[k].outcome == "completed"]
    paired_on, paired_off = decode_summary([a[k] for k in both]), decode_summary([b[k] for k in both])
    return {"on": with_drafts, "off": without, "ratio": ratio(with_drafts["tokens_per_s"], without["tokens_per_s"]),
            "ratio_paired": ratio(paired_on["tokens_per_s"], paired_off["tokens_per_s"]),
            "ratio_per_session_p50": ratio(with_drafts["per_session"]["p50"], without["per_session"]["p50"]),
            "compared_sessions": len(both), "identical_tokens": all(a[k].digest == b[k].digest for k in both),
            "off_trace_hash": off.trace_hash, "off_invariants": {"ok": off.ok, "violations": off.violations[:50]},
            "off_replay": replay_command(off, scenario_arg or off.scenario.name, speculative_flag=True)}


def recovery_summary(sessions: Sequence[SessionRecord]) -> dict:
    recoveries = [r for s in sessions for r in s.recoveries]
    seconds = [r["seconds"] for r in recoveries]
    kinds = Counter(recovery_kind(r["reason"]) for r in recoveries)
    return {"count": len(recoveries), "sessions_with_recovery": sum(1 for s in sessions if s.recoveries),
            "p50_s": _round(percentile(seconds, 50)), "p99_s": _round(percentile(seconds, 99)),
            "max_s": _round(max(seconds) if seconds else None), "by_cause": dict(sorted(kinds.items()))}


def coverage_summary(result: RunResult) -> dict:
    samples = result.samples
    return {"fully_covered_share": _round(sum(1 for s in samples if s.covered == 1.0) / len(samples), 4) if samples else None,
            "min_replicas": min((s.min_replicas for s in samples), default=0),
            "median_live_nodes": percentile([s.live_nodes for s in samples], 50),
            "timeline": [{"t": round(s.t, 1), "live_nodes": s.live_nodes, "min_replicas": s.min_replicas,
                          "covered": round(s.covered, 4), "in_flight": s.in_flight,
                          "tokens_per_s": round(s.tokens_per_s, 3)} for s in samples]}


def balance_summary(result: RunResult) -> dict:
    """Span placement: the joins (when memory first allowed full coverage, when it came), the moves,
    coverage restored after events, and the swarm's throughput (tokens/s summed over clients)."""
    s, joins = result.scenario, result.joins

    def first(test) -> int | None:
        return next((i + 1 for i, j in enumerate(joins) if test(j)), None)

    # for 1x and 2x coverage: the join after which memory first allowed it, and the join after which it was there
    reached = {f"{k}x": {"memory_allows_at": first(lambda j: j["capacity_blocks"] >= k * s.model.blocks),
                         "covered_at": first(lambda j: j["min_replicas"] >= k)} for k in (1, 2)}
    last = joins[-1] if joins else None
    return {"spans": s.balance.spans, "moves": result.counts.get("node_move", 0),
            "joins": {"count": len(joins), **reached,
                      "capacity_x": round(last["capacity_blocks"] / s.model.blocks, 2) if last else None,
                      "min_replicas_after": last["min_replicas"] if last else None},
            "restorations": result.restorations,
            "swarm_tokens_per_s": round(sum(x.tokens for x in result.sessions) / s.duration_s, 3)}


SPOT_CHECK_EVICTION = "caught returning wrong results"  # how a recovery `mesh.spot_check` made begins


def verification_summary(result: RunResult) -> dict | None:
    """Spot checks (`[clients] verify_rate`) and lying hosts ("corrupt"): what the checks cost and caught.

    `redone_share`: tokens chosen, thrown away by a rollback and chosen again, over all tokens chosen
    (redone plus delivered). `detection_s`: for each client and liar it evicted from a route, the
    virtual seconds from the start of that client's first session with the liar on its route (at
    any point) to the eviction. `honest_banned`: peers not hostile that a client banned for lying."""
    s, hostile = result.scenario, result.hostile
    liars = set(hostile.get("ids", ())) if "corrupt" in hostile.get("behaviours", ()) else set()
    if s.clients.verify_rate == 0 and not liars:
        return None
    reports = [x.verification for x in result.sessions if x.verification]

    def total(key: str) -> int:
        return sum(r[key] for r in reports)

    first_met: dict[tuple[str, str], float] = {}
    for session in sorted(result.sessions, key=lambda x: x.started):
        for peer in set(session.met) & liars:
            first_met.setdefault((session.user, peer), session.started)
    evicted: dict[tuple[str, str], float] = {}
    for session in result.sessions:
        for r in session.recoveries:
            if r["failed_peer"] in liars and r["reason"].startswith(SPOT_CHECK_EVICTION):
                key = (session.user, r["failed_peer"])
                evicted[key] = min(evicted.get(key, math.inf), r["at"])
    detection = [at - first_met[key] for key, at in evicted.items()]
    banned = {peer for r in reports for peer in r["banned"]}
    redone, delivered = total("tokens_redone"), sum(x.tokens for x in result.sessions)
    return {"rate": s.clients.verify_rate, "checks": total("checks"), "disagreements": total("disagreements"),
            "unchecked": total("unchecked"), "rollbacks": total("rollbacks"), "tokens_redone": redone,
            "tokens_delivered": delivered,
            "redone_share": _round(redone / (redone + delivered), 4) if redone + delivered else None,
            "liars": len(liars), "liars_met": len({peer for _, peer in first_met}),
            "liars_banned": len(banned & liars), "client_liar_bans": len(evicted),
            "honest_banned": sorted(banned - set(hostile.get("ids", ()))),
            "steps_corrupted": hostile.get("steps_corrupted", 0),
            "detection_s": {"count": len(detection), "p50": _round(percentile(detection, 50)),
                            "max": _round(max(detection) if detection else None)}}


def nat_summary(result: RunResult) -> dict | None:
    """Households behind NAT (`[nat]`, `simulations.nat`): the transport's counts (inference streams
    by path, slots, circuits, punches), the keepers' verdicts, coverage by hosts a newcomer could
    reach (share of blocks, mean over samples, and the share of samples with every block), the
    completion rate, and the sessions started after the first relay failure."""
    if not result.nat:
        return None
    reachable = [s.reachable_covered for s in result.samples if s.reachable_covered is not None]
    hops = result.nat["hops"]
    total = sum(hops.values())
    failures = [t for t, label in result.marks if label.startswith("relay failure")]
    after = [s for s in result.sessions if failures and s.started >= failures[0]]
    return {**result.nat,
            "hop_shares": {k: _round(v / total, 4) for k, v in hops.items()} if total else None,
            "coverage_reachable": {"mean": _round(sum(reachable) / len(reachable), 4) if reachable else None,
                                   "min": _round(min(reachable), 4) if reachable else None,
                                   "fully_covered_share": _round(sum(r == 1.0 for r in reachable) / len(reachable), 4)
                                   if reachable else None},
            "completion_rate": session_summary(result.sessions)["completion_rate"],
            "after_relay_failure": ({"since_s": round(failures[0], 1), **session_summary(after)} if failures else None)}


def nat_line(n: dict) -> str:
    behind = ", ".join(f"{k} {v}" for k, v in n["behind_nat"]["households"].items())
    c, h = n["counts"], n["hops"]
    cov = n["coverage_reachable"]
    line = (f"NAT: households {behind}; {n['relays']} relays ({len(n['relays_killed'])} killed); verdicts "
            f"{', '.join(f'{k} {v}' for k, v in n['verdicts'].items())}; hops direct {h['direct']}, hole-punched "
            f"{h['hole-punched']}, relayed {h['relayed']}; slots {c.get('reservations', 0)} (refused "
            f"{c.get('reservations_refused', 0)}), circuits {c.get('circuits', 0)} (refused "
            f"{c.get('circuits_refused', 0)}), punches {c.get('punches_succeeded', 0)} of {c.get('punches_tried', 0)} "
            f"worked; blocks served by reachable hosts "
            f"{_fmt(None if cov['mean'] is None else 100 * cov['mean'], '%')} on average, all of them in "
            f"{_fmt(None if cov['fully_covered_share'] is None else 100 * cov['fully_covered_share'], '%')} of samples")
    after = n["after_relay_failure"]
    if after:
        line += (f"; sessions started after the relay failure (t={after['since_s']:g} s): {after['started']}, "
                 f"completed {after['completed']}, failed {after['failed_with_error']}, hung {after['hung']}")
    return line


def after_first_fault(result: RunResult) -> dict | None:
    """Sessions started after the first scheduled fault: the share that completed."""
    if not result.marks:
        return None
    first = result.marks[0][0]
    later = [s for s in result.sessions if s.started >= first]
    return {"since_s": round(first, 1), **session_summary(later)}


def replay_command(result: RunResult, scenario_arg: str, *, hostile_flag: bool = False,
                   verify_flag: bool = False, speculative_flag: bool = False) -> str:
    """The command that replays `result` (with `--hostile`, its fraction, when it has hostile hosts
    or `hostile_flag` says the scenario's own fraction was overridden; `--verify-rate` likewise;
    `--speculative` when clients speculate, `--no-speculative` when `speculative_flag` says they were
    told not to)."""
    s = result.scenario
    speculative = " --speculative" if s.clients.speculative else " --no-speculative" if speculative_flag else ""
    hostile = f" --hostile {s.hostile.fraction:g}" if s.hostile.fraction > 0 or hostile_flag else ""
    verify = f" --verify-rate {s.clients.verify_rate:g}" if s.clients.verify_rate > 0 or verify_flag else ""
    return (f"python -m simulations run {scenario_arg} --seed {s.seed} --nodes {s.churn.nodes} "
            f"--clients {s.clients.count} --duration {s.duration_s:g}s{speculative}{hostile}{verify}")


def baseline_summary(base: RunResult, report: dict, *, scenario_arg: str) -> dict:
    """The same scenario and seed without hostile hosts (`base`), beside `report` (the run with them):
    its sessions, and the change in completion rate, in percentage points."""
    sessions = session_summary(base.sessions)
    with_rate, without_rate = report["sessions"]["completion_rate"], sessions["completion_rate"]
    change = None if with_rate is None or without_rate is None else round(100 * (with_rate - without_rate), 2)
    return {"trace_hash": base.trace_hash, "wall_s": round(base.wall_s, 2), "sessions": sessions,
            "recovery": recovery_summary(base.sessions), "tokens_per_s_per_client": throughput_summary(base.sessions),
            "completion_rate_change_points": change,
            "invariants": {"ok": base.ok, "violations": base.violations[:50], "count": len(base.violations)},
            "replay": replay_command(base, scenario_arg, hostile_flag=True)}


def checks_cost(checked: RunResult, unchecked: RunResult, *, scenario_arg: str) -> dict:
    """The same honest swarm and seed with spot checks (`checked`) and without (`unchecked`): the
    clients' tokens/s (tokens over prefill and decode time, checks included) and its ratio."""
    with_checks, without = throughput_summary(checked.sessions), throughput_summary(unchecked.sessions)

    def ratio(a: float | None, b: float | None) -> float | None:
        return None if a is None or not b else round(a / b, 3)

    return {"trace_hash": unchecked.trace_hash, "wall_s": round(unchecked.wall_s, 2),
            "sessions": session_summary(unchecked.sessions), "tokens_per_s_per_client": without,
            "ratio_p50": ratio(with_checks["p50"], without["p50"]),
            "ratio_per_session_p50": ratio(with_checks["per_session"]["p50"], without["per_session"]["p50"]),
            "invariants": {"ok": unchecked.ok, "violations": unchecked.violations[:50], "count": len(unchecked.violations)},
            "replay": replay_command(unchecked, scenario_arg, hostile_flag=True, verify_flag=True)}


def build_report(result: RunResult, *, scenario_arg: str = "") -> dict:
    s = result.scenario
    return {
        "scenario": s.name, "seed": s.seed, "compute": s.compute, "nodes": s.churn.nodes,
        "cloud_nodes": s.cloud.nodes, "clients": s.clients.count, "duration_s": s.duration_s,
        "virtual_s": round(result.virtual_s, 3), "wall_s": round(result.wall_s, 2),
        "virtual_per_wall": round(result.virtual_s / result.wall_s, 1) if result.wall_s > 0 else None,
        "trace_hash": result.trace_hash, "model": describe(s.model),
        "sessions": session_summary(result.sessions), "after_first_fault": after_first_fault(result),
        "tokens_per_s_per_client": throughput_summary(result.sessions), "decode": decode_summary(result.sessions),
        "recovery": recovery_summary(result.sessions), "coverage": coverage_summary(result),
        "balance": balance_summary(result),
        "hosts": result.hosts, "network": result.network, "hostile": result.hostile or None,
        "verification": verification_summary(result), "fetch": result.fetch or None, "nat": nat_summary(result),
        "events": {k: v for k, v in sorted(result.counts.items()) if not k.startswith(("session", "sample"))},
        "marks": [{"t": round(t, 1), "label": label} for t, label in result.marks],
        "invariants": {"ok": result.ok, "violations": result.violations[:50], "count": len(result.violations)},
        "replay": replay_command(result, scenario_arg or s.name),
    }


def write_report(report: dict, result: RunResult, out: Path) -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    written = [out / "report.json", out / "sessions.json"]
    written[0].write_text(json.dumps(report, indent=1) + "\n")
    written[1].write_text(json.dumps([s.to_json() for s in result.sessions]) + "\n")
    if result.trace_lines:
        written.append(out / "trace.txt")
        written[-1].write_text("\n".join(result.trace_lines) + "\n")
    return written


def _fmt(value: float | None, unit: str = "") -> str:
    return "-" if value is None else f"{value:.2f}{unit}" if value < 100 else f"{value:.0f}{unit}"


def table_header() -> str:
    return ("| scenario | seed | nodes | clients | virtual | wall | sessions | completed | failed | hung | "
            "tok/s per client p50 / p95 | recovery p50 / p99 | recoveries | fully covered | trace hash |\n"
            "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")


def table_row(report: dict) -> str:
    s, t, r, c = report["sessions"], report["tokens_per_s_per_client"], report["recovery"], report["coverage"]
    covered = "-" if c["fully_covered_share"] is None else f"{100 * c['fully_covered_share']:.0f}%"
    return (f"| {report['scenario']} | {report['seed']} | {report['nodes']}+{report['cloud_nodes']} dc | "
            f"{report['clients']} | {format_duration(report['duration_s'])} | {report['wall_s']:.0f} s | "
            f"{s['started']} | {s['completed']} | {s['failed_with_error']} | {s['hung']} | "
            f"{_fmt(t['p50'])} / {_fmt(t['p95'])} | {_fmt(r['p50_s'], ' s')} / {_fmt(r['p99_s'], ' s')} | "
            f"{r['count']} | {covered} | `{report['trace_hash']}` |")


def summary(report: dict) -> str:
    """The table printed at the end of a run, and the verdict on the invariants."""
    lines = [table_header(), table_row(report)]
    after = report["after_first_fault"]
    if after:
        lines.append(f"sessions started after the first fault (t={after['since_s']:g} s): {after['started']}, "
                     f"completed {after['completed']}, failed {after['failed_with_error']}, hung {after['hung']}")
    b = report["balance"]
    if b["joins"]["count"]:
        j = b["joins"]
        lines.append(f"spans {b['spans']}: memory allowed 1x / 2x coverage at join {j['1x']['memory_allows_at']} / "
                     f"{j['2x']['memory_allows_at']}, covered at join {j['1x']['covered_at']} / {j['2x']['covered_at']}; "
                     f"after {j['count']} joins {j['capacity_x']}x memory, min replicas {j['min_replicas_after']}; "
                     f"{b['moves']} moves; swarm {b['swarm_tokens_per_s']:.2f} tok/s")
    for r in b["restorations"]:
        lines.append(f"{r['label']}: min replicas fell to {r['lowest_min_replicas']}; "
                     + (f"every block served again after {r['after_s']:g} s" if r["restored"] else "NOT restored"))
    if report.get("fetch"):
        lines.append(fetch_line(report["fetch"]))
    if report.get("nat"):
        lines.append(nat_line(report["nat"]))
    if report["sessions"]["errors"]:
        lines.append("errors: " + ", ".join(f"{k} x{v}" for k, v in report["sessions"]["errors"].items()))
    if report.get("hostile"):
        lines.append(hostile_line(report["hostile"]))
    if report.get("verification"):
        lines.append(verification_line(report["verification"]))
    lines.append(decode_line(report["decode"]))
    if report.get("without_speculation"):
        g = report["without_speculation"]
        lines.append(f"without speculation (same seed, trace hash {g['off_trace_hash']}): decode "
                     f"{_fmt(g['off']['tokens_per_s'])} tok/s, with it {_fmt(g['on']['tokens_per_s'])}: ratio {g['ratio']} "
                     f"(same sessions: {g['ratio_paired']}; per session p50: {g['ratio_per_session_p50']}); tokens identical in the "
                     f"{g['compared_sessions']} sessions both completed: {g['identical_tokens']}")
        if not g["off_invariants"]["ok"]:
            lines.append("WITHOUT-SPECULATION RUN VIOLATED INVARIANTS: " + "; ".join(g["off_invariants"]["violations"][:3])
                         + f"; replay with: {g['off_replay']}")
    if report.get("baseline"):
        lines.extend(baseline_lines(report["baseline"], report))
    if report["invariants"]["ok"]:
        lines.append(f"invariants hold; trace hash {report['trace_hash']}")
    else:
        lines.append(f"INVARIANTS VIOLATED ({report['invariants']['count']}):")
        lines.extend(f"  {v}" for v in report["invariants"]["violations"][:10])
        lines.append(f"replay with: {report['replay']}")
    return "\n".join(lines)


def decode_line(d: dict) -> str:
    """Decode speed, and speculation's drafts where there were any."""
    p = d["per_session"]
    line = (f"decode: {d['tokens']} tokens in {d['sessions']} completed sessions, {_fmt(d['tokens_per_s'])} tok/s "
            f"(per session p5 / p50 / p95 {_fmt(p['p5'])} / {_fmt(p['p50'])} / {_fmt(p['p95'])})")
    sp = d["speculation"]
    if sp["drafted"]:
        line += (f"; speculation: {sp['accepted']}/{sp['drafted']} drafts kept ({100 * sp['acceptance']:.0f}%), "
                 f"{sp['passes_per_token']:.3f} passes per token")
    return line


def fetch_line(f: dict) -> str:
    """Downloads (`[fetch]`): coverage times, how long joining and downloading took, bytes moved."""
    c, j, d, b, n = f["coverage"], f["join_s"], f["download_s"], f["bytes"], f["counts"]

    def at(value: float | None) -> str:
        return "never" if value is None else format_duration(value)

    after = f["sessions_after_coverage"]
    sessions = "" if after is None else (f"; sessions started after 1x coverage: {after['started']}, completed "
                                         f"{after['completed']}, failed {after['failed_with_error']}, hung {after['hung']}")
    return (f"downloads from {len(f['seeds'])} seed(s), {f['model_bytes'] / 1e9:.1f} GB model in {f['pieces']} pieces: "
            f"every block served at {at(c['1x_s'])}, twice at {at(c['2x_s'])}; {f['hosts']['serving']} of "
            f"{f['hosts']['joining']} joiners serving; join p50 / p95 {_fmt(j['p50'], ' s')} / {_fmt(j['p95'], ' s')}, "
            f"download p50 / p95 {_fmt(d['p50'], ' s')} / {_fmt(d['p95'], ' s')}; moved {b['pieces'] / 1e9:.2f} GB of "
            f"pieces ({b['from_seeds'] / 1e9:.2f} GB from seeds) and {b['manifests'] / 1e6:.1f} MB of manifests; "
            f"opens refused (overloaded) {n.get('opens_refused_overloaded', 0)}, fetches failed without a manifest "
            f"{n.get('fetch_failed_no_manifest', 0)}, request timeouts {n.get('request_timeouts', 0)}{sessions}")


def hostile_line(h: dict) -> str:
    """What the hostile hosts tried, and what the defences did with it."""
    c = h["counts"]

    def total(prefix: str) -> int:
        return sum(v for k, v in c.items() if k.startswith(prefix))

    return (f"hostile: {h['hosts']} hosts ({100 * h['fraction']:g}% of the swarm; {', '.join(h['behaviours'])}): "
            f"forgeries refused {c.get('forgeries_refused', 0)}, accepted {c.get('forgeries_accepted', 0)}; "
            f"hoarded sessions opened {c.get('hoard_opened', 0)}, refused {total('hoard_refused_')} "
            f"({c.get('hoard_refused_per_peer', 0)} at the per-peer cap), evicted "
            f"{c.get('keepalive_lost_evicted', 0)}, expired {c.get('keepalive_lost_expired', 0)}; "
            f"rewinds {c.get('rewinds', 0)}, refused by the prefill budget {c.get('rewind_lost_prefill_budget', 0)}; "
            f"stalls {c.get('stalls', 0)} ({c.get('stalls_half_frame', 0)} after half a frame); clients failed over "
            f"from hostile hops {h['failovers_from_hostile']} times in "
            f"{h['sessions_failed_over_from_hostile']} sessions")


def verification_line(v: dict) -> str:
    d = v["detection_s"]
    share = "-" if v["redone_share"] is None else f"{100 * v['redone_share']:.2f}%"
    return (f"spot checks at rate {v['rate']:g}: {v['checks']} checks, {v['disagreements']} disagreements, "
            f"{v['unchecked']} without a checker; liars {v['liars']} ({v['steps_corrupted']} steps corrupted), met "
            f"{v['liars_met']}, banned {v['liars_banned']} ({v['client_liar_bans']} client bans, detection p50 / max "
            f"{_fmt(d['p50'], ' s')} / {_fmt(d['max'], ' s')}); honest peers banned {len(v['honest_banned'])}; "
            f"rollbacks {v['rollbacks']}, tokens redone {v['tokens_redone']} ({share} of tokens chosen)")


def baseline_lines(b: dict, report: dict) -> list[str]:
    s, mine = b["sessions"], report["sessions"]
    rate = "-" if mine["completion_rate"] is None else f"{100 * mine['completion_rate']:.2f}%"
    base_rate = "-" if s["completion_rate"] is None else f"{100 * s['completion_rate']:.2f}%"
    lines = [f"without the hostile hosts (same seed, trace hash {b['trace_hash']}, {b['wall_s']:.0f} s wall): "
             f"sessions {s['started']}, completed {s['completed']}, failed {s['failed_with_error']}, hung {s['hung']}, "
             f"recoveries {b['recovery']['count']}",
             f"completion rate with them {rate}, without {base_rate}: "
             f"{b['completion_rate_change_points']:+g} points"]
    off = b.get("without_checks")
    if off:
        with_checks, without = b["tokens_per_s_per_client"], off["tokens_per_s_per_client"]
        lines.append(f"without them and without spot checks (trace hash {off['trace_hash']}): tok/s per client p50 "
                     f"{_fmt(without['p50'])}, with checks {_fmt(with_checks['p50'])}: ratio {off['ratio_p50']} "
                     f"(per session p50: {off['ratio_per_session_p50']})")
        if not off["invariants"]["ok"]:
            lines.append(f"UNCHECKED BASELINE INVARIANTS VIOLATED ({off['invariants']['count']}); "
                         f"replay with: {off['replay']}")
    if not b["invariants"]["ok"]:
        lines.append(f"BASELINE INVARIANTS VIOLATED ({b['invariants']['count']}):")
        lines.extend(f"  {v}" for v in b["invariants"]["violations"][:10])
        lines.append(f"replay with: {b['replay']}")
    return lines
