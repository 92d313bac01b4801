"""Gangs (`synord run --nodes N`): N tasks on N distinct providers, all or nothing.

The driver between the gang machine (synord.protocols.gang: who to ask, when to
commit, when to let go) and the market (`MarketService.hold` /
`commit_held` / `release_held`: one negotiation per member, stopped before the
countersign).  Once every member is committed, each becomes an ordinary
member job (its own task stream, output, history, receipt) started on its
agreement, with the roster in its environment:

    SYNORD_GANG_ID       the gang's job id
    SYNORD_GANG_RANK     0 .. N-1 (members sorted by peer id)
    SYNORD_GANG_SIZE     N
    SYNORD_GANG_MEMBERS  JSON [{"rank", "peer", "addrs"}] (addrs: how to dial it over the mesh)

The gang's own job (the parent) owns no task: its state follows its members
(running while any runs; succeeded when all did; the first non-zero exit
code), its output is theirs merged, each line marked with its member's rank.

State it owns: the parent's `runstate.gang` ({size, members: [{rank, job,
provider}]}) and each member's ({parent, rank, size}); both persist with the
job rows, so a restarted consumer re-attaches the members as any job and the
parent follows them again.  A parent found uncommitted after a restart fails:
its holds lapse on the providers by themselves (the countersign timeout).
"""

from __future__ import annotations

import json
import logging
import math
import uuid
from dataclasses import replace
from typing import TYPE_CHECKING, Any, AsyncIterator

import trio

from synord.protocols import gang as gm
from synord.protocols.envelope import now_ms
from synord.protocols.negotiation import Terms
from synord.protocols.refusals import REFUSALS

from ..errors import Invalid
from ..market.port import HoldRefused, NoPlacement, PlacementRejected
from .output import data_line, end_line
from .spec import TERMINAL

if TYPE_CHECKING:
    from .consumer import ConsumerJob, ConsumerJobs

log = logging.getLogger("synord.jobs.gang")

POLL_S = 0.2  # the parent looks at its members at least this often
ROSTER_MAX = 4000  # bytes of SYNORD_GANG_MEMBERS (an env value's limit is 4096 with its name)


def nodes_of(req: dict) -> int | None:
    """The request's ``nodes`` (None or 1: an ordinary job); Invalid at once when bad."""
    n = req.get("nodes")
    if n is None:
        return None
    if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= gm.MAX_GANG:
        raise Invalid(f"bad task: nodes must be an integer from 1 to {gm.MAX_GANG}")
    return n if n > 1 else None


def is_parent(job: "ConsumerJob") -> bool:
    return bool(job.runstate.gang) and "parent" not in job.runstate.gang


def roster_env(gang_id: str, rank: int, roster: list[dict]) -> dict[str, str]:
    members = json.dumps(roster, separators=(",", ":"))
    if len(members) > ROSTER_MAX:  # many members with many addresses: one address each
        members = json.dumps([{**m, "addrs": m["addrs"][:1]} for m in roster], separators=(",", ":"))
    return {"SYNORD_GANG_ID": gang_id, "SYNORD_GANG_RANK": str(rank),
            "SYNORD_GANG_SIZE": str(len(roster)), "SYNORD_GANG_MEMBERS": members}


# ---- reserving: the machine's actions performed on the market -----------------------------

async def reserve(market, needs, size: int, within_s: float, seed: int | None = None) -> tuple[list[Terms], gm.Gang]:
    """Hold ``size`` distinct providers and commit them together: their terms in rank
    order. NoPlacement (everything released) when the gang cannot be had in ``within_s``."""
    shortlist = max(8, 2 * size)
    cands = {c.ask.peer: c for c in market.candidates(needs, shortlist=shortlist)}
    gang = gm.Gang(size, list(cands), deadline=now_ms() + int(within_s * 1000), seed=seed)
    held: dict[str, Terms] = {}
    asking: dict[str, trio.CancelScope] = {}  # members asked, not answered yet
    send, recv = trio.open_memory_channel(math.inf)

    async def ask(peer: str, rnd: int) -> None:
        scope = asking[peer] = trio.CancelScope()
        try:
            with scope:
                terms, until = await market.hold(cands[peer], needs)
            if scope.cancelled_caught:
                return  # released while asked: market.hold withdrew the proposal
            send.send_nowait((rnd, peer, terms, until))  # no checkpoint: the hold is never lost
        except HoldRefused as exc:
            send.send_nowait((rnd, peer, None, exc.reason))
        except PlacementRejected:
            send.send_nowait((rnd, peer, None, "other"))
        finally:
            if asking.get(peer) is scope:
                del asking[peer]

    async def release(peer: str) -> None:
        scope = asking.pop(peer, None)
        if scope is not None:
            scope.cancel()
        terms = held.pop(peer, None)
        if terms is not None:
            await market.release_held(terms, "gang released")

    result: list[Terms] | None = None
    async with trio.open_nursery() as nursery:
        try:
            actions = gang.start(now_ms())
            while True:
                for a in actions:
                    if isinstance(a, gm.Reserve):
                        nursery.start_soon(ask, a.peer, gang.rounds)
                    elif isinstance(a, gm.Release):
                        await release(a.peer)
                if any(isinstance(a, gm.Commit) for a in actions):
                    result = await _commit(market, gang, held)
                    break
                if gang.done:
                    break
                actions = []
                answer = None
                with trio.move_on_after(max(0.0, (gang.next_deadline() - now_ms()) / 1000)):
                    answer = await recv.receive()
                if answer is not None:
                    actions = await _answer(market, gang, held, *answer)
                    continue
                if gang.phase is gm.Phase.BACKOFF:  # a new round: the book may have changed
                    fresh = market.candidates(needs, shortlist=shortlist)
                    cands.update({c.ask.peer: c for c in fresh})
                    gang.update_candidates([c.ask.peer for c in fresh])
                actions = gang.tick(now_ms())
        finally:
            nursery.cancel_scope.cancel()  # asks still in flight: market.hold withdraws them
            with trio.CancelScope(shield=True), trio.move_on_after(5):
                if gang.phase is not gm.Phase.COMMITTED:
                    for peer in list(held):
                        await release(peer)
                    while True:  # holds that arrived after the end
                        try:
                            _, _, terms, _ = recv.receive_nowait()
                        except trio.WouldBlock:
                            break
                        if terms is not None:
                            await market.release_held(terms, "gang released")
    if result is None:  # raised out here: not wrapped in the nursery's exception group
        raise NoPlacement(f"gang of {size}: {gang.reason}")
    return result, gang


async def _answer(market, gang: gm.Gang, held: dict[str, Terms], rnd: int, peer: str,
                  terms: Terms | None, what: Any) -> list[Any]:
    """A member's answer (terms and hold deadline, or a refusal slug) into the machine."""
    if rnd != gang.rounds:  # an answer from an earlier round: let it go
        if terms is not None:
            await market.release_held(terms, "gang moved on")
        return []
    try:
        if terms is None:
            log.info("gang member refused", extra={"peer": peer[:16], "reason": what, "round": rnd})
            return gang.refused(peer, what, now_ms())
        held[peer] = terms
        return gang.held(peer, terms.aid, what, now_ms())
    except gm.GangError as exc:
        REFUSALS.count("gang", "illegal_event")
        log.info("gang event refused", extra={"peer": peer[:16], "reason": exc.reason})
        return []


async def _commit(market, gang: gm.Gang, held: dict[str, Terms]) -> list[Terms] | None:
    """Countersign every member; a hold that lapsed in between undoes the others."""
    ranked = [held[m.peer] for m in gang.ranked()]
    done: list[Terms] = []
    for terms in ranked:
        if not await market.commit_held(terms):
            for t in done:
                await market.abandon(t, "gang member's hold lapsed during the commit")
            gang.phase, gang.reason = gm.Phase.FAILED, "a hold lapsed during the commit"
            return None
        done.append(terms)
    held.clear()
    return ranked


# ---- the parent job ------------------------------------------------------------------------

async def drive(jobs: "ConsumerJobs", parent: "ConsumerJob", resumed: bool) -> None:
    """The gang's life: reserve, commit, start every member, follow them."""
    with jobs.failing_on_error(parent, "gang"):
        if resumed and not parent.runstate.gang.get("members"):
            jobs._set_state(parent, "failed", error="consumer restarted before the gang was committed")
            return
        if not resumed:
            await _place(jobs, parent)
        await _follow(jobs, parent)


async def _place(jobs: "ConsumerJobs", parent: "ConsumerJob") -> None:
    size = parent.runstate.gang["size"]
    needs = parent.jobspec.needs()
    jobs._set_state(parent, "negotiating")
    jobs._progress(parent, "placing", 0, size, note=f"reserving {size} providers together")
    await jobs.market.announce_bid(needs, parent.id)
    reserved = await _reserve_unless_cancelled(jobs, parent, needs, size)
    if reserved is None:
        return  # cancelled while reserving: everything held was released
    terms, gang = reserved
    roster = [{"rank": r, "peer": t.provider, "addrs": jobs.mesh.dialable_addrs(t.provider)[:3]}
              for r, t in enumerate(terms)]
    members = []
    for r, t in enumerate(terms):
        env = roster_env(parent.id, r, roster)
        spec = replace(parent.jobspec, env=tuple((k, v) for k, v in parent.jobspec.env if k not in env)
                       + tuple(env.items()))
        m = type(parent)(id=uuid.uuid4().hex[:16], jobspec=spec)  # a ConsumerJob (no import circle)
        m.runstate.gang = {"parent": parent.id, "rank": r, "size": size}
        jobs.jobs[m.id] = m
        jobs._save(m)
        members.append((m, t))
    parent.runstate.gang = {"size": size, "rounds": gang.rounds, "refusals": dict(gang.refusals),
                            "members": [{"rank": r, "job": m.id, "provider": t.provider}
                                        for r, (m, t) in enumerate(members)]}
    jobs._save(parent)
    jobs._notice(parent, f"{size} providers committed together after {gang.rounds} round(s)")
    await _start_all(jobs, parent, members)


async def _reserve_unless_cancelled(jobs: "ConsumerJobs", parent: "ConsumerJob", needs, size: int):
    """`reserve`, given up (releasing what it holds) when the user cancels the gang."""
    out: dict[str, Any] = {}

    async def watch(scope: trio.CancelScope) -> None:
        while not parent.cancel_requested:
            with trio.move_on_after(POLL_S):
                await parent.changed.wait()
        scope.cancel()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(watch, nursery.cancel_scope)
        try:
            out["ok"] = await reserve(jobs.market, needs, size, jobs.placement_timeout_s)
        except NoPlacement as exc:  # raised outside the nursery, not as an exception group
            out["error"] = exc
        nursery.cancel_scope.cancel()
    if "error" in out:
        raise out["error"]
    return out.get("ok")


async def _start_all(jobs: "ConsumerJobs", parent: "ConsumerJob", members: list) -> None:
    """Start every member on its agreement; if one cannot start, none runs on."""
    sessions: dict[str, Any] = {}
    failed: list[str] = []

    async def launch(m, t) -> None:
        try:
            sessions[m.id] = await jobs._launch(m, t)
        except Exception as exc:
            failed.append(f"member {m.runstate.gang['rank']} on {t.provider[:12]}: {exc}")

    async with trio.open_nursery() as nursery:
        for m, t in members:
            nursery.start_soon(launch, m, t)
    if failed:
        for m, t in members:
            if m.id not in sessions:
                await jobs.market.abandon(t, "another gang member did not start")
                jobs._set_state(m, "failed", error="the gang did not start: " + failed[0])
            else:
                m.cancel_requested = True  # its driver sends the cancel at once
    for m, _ in members:
        if m.id in sessions:
            jobs._nursery.start_soon(jobs._drive, m, False, sessions[m.id])
    if failed:
        jobs._set_state(parent, "failed", error="the gang did not start: " + "; ".join(failed[:3]))
        return
    jobs._set_state(parent, "running")
    jobs._progress(parent, "running", note=f"all {len(members)} members running")


def _members(jobs: "ConsumerJobs", parent: "ConsumerJob") -> list["ConsumerJob"]:
    return [jobs.jobs[e["job"]] for e in parent.runstate.gang.get("members", []) if e["job"] in jobs.jobs]


async def _follow(jobs: "ConsumerJobs", parent: "ConsumerJob") -> None:
    """The parent's state follows its members'; a cancel of the parent cancels them."""
    cancelled = False
    while True:
        members = _members(jobs, parent)
        if parent.cancel_requested and not cancelled:
            cancelled = True
            for m in members:
                if m.state not in TERMINAL:
                    jobs._nursery.start_soon(jobs.cancel, m.id)
        if all(m.state in TERMINAL for m in members):
            break
        if parent.state not in TERMINAL and parent.state != "running" and any(
                m.state == "running" for m in members):
            jobs._set_state(parent, "running")
        with trio.move_on_after(POLL_S):
            await parent.changed.wait()
    if parent.state in TERMINAL:
        return
    codes = [m.exit_code for m in members]
    bad = [m for m in members if m.state != "succeeded"]
    exit_code = next((c for c in codes if c), 0 if all(c == 0 for c in codes) else None)
    if cancelled:
        jobs._set_state(parent, "cancelled", exit_code=exit_code)
    elif bad:
        jobs._set_state(parent, "failed", exit_code=exit_code, error="; ".join(
            f"member {m.runstate.gang['rank']}: {m.state}" + (f" ({m.error})" if m.error else "")
            for m in bad[:3]))
    else:
        jobs._set_state(parent, "succeeded", exit_code=exit_code)


def describe(jobs: "ConsumerJobs", job: "ConsumerJob") -> dict:
    """A job's JSON; a gang's lists its members with their state."""
    out = job.to_json()
    if is_parent(job):
        by_id = {m.id: m for m in _members(jobs, job)}
        out["members"] = [{**e, "state": by_id[e["job"]].state, "exit_code": by_id[e["job"]].exit_code}
                          for e in job.runstate.gang.get("members", []) if e["job"] in by_id]
    return out


async def output_lines(jobs: "ConsumerJobs", parent: "ConsumerJob", follow: bool) -> AsyncIterator[bytes]:
    """Every member's output, each line marked with its rank ({"member": r, ...}), then the end."""
    last: dict[str, int] = {}
    while True:
        changed = parent.changed
        members = _members(jobs, parent)
        new = False
        for m in members:
            for seq, s, data in jobs.jobstore.output_after(m.id, last.get(m.id, 0)):
                last[m.id], new = seq, True
                yield data_line(s, data, m.runstate.gang["rank"])
        if parent.state in TERMINAL and all(not m.pending_output for m in members) and not new:
            yield end_line(parent.exit_code, parent.state, parent.error)
            return
        if not follow and not new:
            return
        if not new:
            with trio.move_on_after(POLL_S):
                await changed.wait()
