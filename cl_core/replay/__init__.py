"""Replay strategies for continual learning: what to keep in a bounded replay memory and what to replay.

Each strategy lives in its own module and registers itself by name:
- `random`   reservoir sampling (Vitter 1985), uniform picks;
- `priority` highest-loss memory, prioritized picks (Schaul et al. 2016), losses refreshed by `update`;
- `herding`  iCaRL herding exemplars per task, balanced across tasks (Rebuffi et al. 2017);
- `gradient` GSS-greedy gradient-diversity memory (Aljundi et al. 2019).
Build one with `make_replay_strategy(name, capacity, seed, **options)`; persist it with `save(dir)` and restore it
with `load(dir)` or `load_replay_strategy(dir)`. A new strategy is one new module here (`REPLAY_STRATEGIES` imports
every module of this package on its first lookup).
"""

from cl_core.replay.base import (
    REPLAY_STRATEGIES,
    Candidate,
    FeatureSource,
    ReplayStrategy,
    available_replay_strategies,
    load_replay_strategy,
    make_replay_strategy,
    register_replay_strategy,
)
from cl_core.replay.gradient import GradientDiversityReplay
from cl_core.replay.herding import HerdingReplay
from cl_core.replay.priority import PriorityReplay
from cl_core.replay.reservoir import ReservoirReplay

__all__ = [
    "REPLAY_STRATEGIES",
    "Candidate",
    "FeatureSource",
    "GradientDiversityReplay",
    "HerdingReplay",
    "PriorityReplay",
    "ReplayStrategy",
    "ReservoirReplay",
    "available_replay_strategies",
    "load_replay_strategy",
    "make_replay_strategy",
    "register_replay_strategy",
]
