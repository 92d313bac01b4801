"""Discrete-event simulator of a spot/on-demand market (`synord sim`).

It drives the daemon's own decision code — `synord.jobs.migration`
(grace-period decision, greedy and optimal assignment), `synord.market`
(matching, router, pricing) and hwprobe's known-device table — through
simulated worlds, so that what the simulator measures is what the daemon
would decide.  No daemon, no network: pure Python plus numpy/scipy.

    engine.py      the event queue
    scenario.py    TOML scenarios (package data in scenarios/) and their checks
    world.py       instances, tasks, preemptions, placement: one simulated run
    policies.py    which market a task goes to; planners; Synkti's defect replicas
    accounting.py  the two billing rule sets (as published, honest) and the ledger
    runner.py      Monte Carlo over seeds, paired comparisons
    report.py      tables, JSON, PNG
"""
