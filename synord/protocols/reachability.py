"""Am I reachable from the internet? AutoNAT votes -> public / private / unknown (sans-IO).

Theory of operation: every so often the driver (synord.protocols.p2p_autonat) asks a few
connected peers to dial us back (AutoNAT v1). Each answer is a ``Vote`` from one server:
``ok`` (it reached us), ``failed`` (it tried our addresses and could not), ``refused`` (it
would not try, e.g. none of our addresses matched the address it saw us at: we only know
private addresses, so nobody outside can dial them) or ``error`` (no answer). ``plan`` says whom to ask when. We keep the
latest vote per server for ``vote_ttl_s``; ``error`` votes say nothing about us and do not
count. The status is ``public`` when at least ``min_votes`` servers reached us and they
outnumber the failures, ``private`` when at least ``min_votes`` failed/refused and none
reached us, ``unknown`` otherwise. Servers on our own LAN (seen at a private address) cannot
tell whether the internet reaches us: they are never asked.

The NAT type is a guess from identify's observed addresses (see ``nat_type``): a router that
rewrites source ports per destination (``symmetric``) defeats hole punching; only a relay
helps there.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

from . import addrs as addr_policy

OK, FAILED, REFUSED, ERROR = "ok", "failed", "refused", "error"
PUBLIC, PRIVATE, UNKNOWN = "public", "private", "unknown"


@dataclass(frozen=True)
class Vote:
    server: str
    result: str  # OK / FAILED / REFUSED / ERROR
    at: float
    detail: str = ""  # the server's status text, or the address it reached us at

    def to_json(self) -> dict:
        return {"server": self.server, "result": self.result, "at": round(self.at, 3),
                "detail": self.detail}


@dataclass
class Reachability:
    min_votes: int = 2
    vote_ttl_s: float = 1800.0
    recheck_s: float = 300.0  # once the status is known
    retry_s: float = 10.0  # while unknown
    max_servers: int = 3  # asked per round
    votes: dict[str, Vote] = field(default_factory=dict)
    observed: dict[str, str] = field(default_factory=dict)  # observer -> our address it saw
    local_ports: dict[str, int | None] = field(default_factory=dict)  # observer -> our port
    last_round: float | None = None
    pending: set[str] = field(default_factory=set)  # asked, no answer yet

    # ---- votes
    def record(self, server: str, result: str, now: float, detail: str = "") -> None:
        if result not in (OK, FAILED, REFUSED, ERROR):
            raise ValueError(f"unknown AutoNAT result {result!r}")
        self.votes[server] = Vote(server, result, now, detail[:200])
        self.pending.discard(server)
        for old in [s for s, v in self.votes.items() if now - v.at > self.vote_ttl_s]:
            del self.votes[old]  # bounded by the servers of the last ttl, not of all time

    def _live(self, now: float) -> list[Vote]:
        return [v for v in self.votes.values() if now - v.at <= self.vote_ttl_s]

    def tally(self, now: float) -> tuple[int, int]:
        """(servers that reached us, servers that could not or would not)."""
        live = self._live(now)
        return (sum(v.result == OK for v in live),
                sum(v.result in (FAILED, REFUSED) for v in live))

    def status(self, now: float) -> str:
        ok, bad = self.tally(now)
        if ok >= self.min_votes and ok > bad:
            return PUBLIC
        if bad >= self.min_votes and ok == 0:
            return PRIVATE
        return UNKNOWN

    def confidence(self, now: float) -> float:
        """Share of counted votes that agree with the status (0 when unknown)."""
        ok, bad = self.tally(now)
        st = self.status(now)
        if st == UNKNOWN or ok + bad == 0:
            return 0.0
        return round((ok if st == PUBLIC else bad) / (ok + bad), 3)

    # ---- scheduling
    def due(self, now: float) -> bool:
        if self.last_round is None:
            return True
        wait = self.recheck_s if self.status(now) != UNKNOWN else self.retry_s
        return now - self.last_round >= wait

    def pick_servers(self, candidates: dict[str, str | None], now: float,
                     rng: random.Random | None = None) -> list[str]:
        """Whom to ask this round, from connected AutoNAT servers -> the IP we see each at.
        Not a server on our LAN or behind a relay (it cannot judge the internet's view);
        those without a live vote first."""
        outside = [p for p, ip in candidates.items()
                   if ip is not None and addr_policy.scope_of_ip(ip) == addr_policy.PUBLIC]
        live = {v.server for v in self._live(now) if v.result != ERROR}
        fresh = [p for p in outside if p not in live]
        stale = [p for p in outside if p in live]
        (rng or random).shuffle(fresh)
        (rng or random).shuffle(stale)
        return (fresh + stale)[:self.max_servers]

    def wait_s(self, now: float) -> float:
        """How long the driver may sleep before ``plan`` can have work (unless a peer connects)."""
        if self.last_round is None:
            return self.retry_s
        wait = self.recheck_s if self.status(now) != UNKNOWN else self.retry_s
        return max(1.0, self.last_round + wait - now)

    def plan(self, candidates: dict[str, str | None], now: float,
             rng: random.Random | None = None) -> list[str]:
        """The servers to ask now (``[]``: nothing to do): a full round when one is due; while
        the status is unknown, also any server we have no vote from yet (a newly connected
        one), so that a starting node does not wait ``retry_s`` for its second vote."""
        if self.due(now):
            picked = self.pick_servers(candidates, now, rng)
        elif self.status(now) == UNKNOWN:
            voted = {v.server for v in self._live(now)}  # no answer: asked again when due
            picked = [p for p in self.pick_servers(candidates, now, rng) if p not in voted]
        else:
            picked = []
        picked = [p for p in picked if p not in self.pending]
        if picked:
            self.last_round = now
            self.pending.update(picked)
        return picked

    # ---- observed addresses and the NAT type
    def observe(self, observer: str, our_addr: str, local_port: int | None = None) -> None:
        """identify: ``observer`` saw our connection come from ``our_addr``; ``local_port``
        is that connection's port on our side (None if unknown)."""
        if addr_policy.scope(our_addr) == addr_policy.PUBLIC and "/p2p-circuit" not in our_addr:
            self.observed[observer] = our_addr
            self.local_ports[observer] = local_port

    def forget_observer(self, observer: str) -> None:
        self.observed.pop(observer, None)
        self.local_ports.pop(observer, None)

    def observed_addrs(self) -> list[str]:
        return sorted(set(self.observed.values()))

    def nat_type(self, local_ips: list[str] = ()) -> str:
        """A guess from identify's observations:
        ``none`` -- observers see one of our own addresses (no NAT in between);
        ``symmetric`` -- one local socket seen at different external ports, or the router
        rewrote the source port of most connections (per-destination mappings: hole punching
        fails, only a relay helps);
        ``cone`` -- ports kept (the mapping is reused for every destination: punchable);
        ``unknown`` -- fewer than two observations."""
        obs = [(addr_policy.ip_of(a), _tcp_port(a), self.local_ports.get(o))
               for o, a in self.observed.items()]
        obs = [o for o in obs if o[0] and o[1] is not None]
        if any(ip in local_ips for ip, _, _ in obs):
            return "none"
        by_local: dict[int, set[int]] = {}
        for _, ext, local in obs:
            if local is not None:
                by_local.setdefault(local, set()).add(ext)
        if any(len(exts) > 1 for exts in by_local.values()):
            return "symmetric"
        known = [(ext, local) for _, ext, local in obs if local is not None]
        if len(obs) < 2 or not known:
            return UNKNOWN
        changed = sum(ext != local for ext, local in known)
        return "symmetric" if changed * 2 > len(known) else "cone"

    # ---- report
    def to_json(self, now: float, local_ips: list[str] = ()) -> dict:
        ok, bad = self.tally(now)
        return {"status": self.status(now), "confidence": self.confidence(now),
                "votes_ok": ok, "votes_failed": bad,
                "votes": [v.to_json() for v in sorted(self.votes.values(), key=lambda v: v.at)],
                "observed_addrs": self.observed_addrs(), "nat_type": self.nat_type(local_ips)}


def _tcp_port(addr: str) -> int | None:
    parts = addr.split("/")
    try:
        return int(parts[parts.index("tcp") + 1])
    except (ValueError, IndexError):
        return None
