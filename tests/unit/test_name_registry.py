"""The one name registry: methods, replay strategies, priority functions and routers share it, and the config's
name checks come from it, so a new extension is one file (no list of names to edit anywhere else)."""

from __future__ import annotations

import sys
import textwrap
from pathlib import Path

import pytest

from cl_core.bank.router import ROUTERS
from cl_core.config import ContinualConfig
from cl_core.errors import ConfigError, InvalidInputError
from cl_core.methods import METHODS, AntiForgettingMethod, MethodSettings, make_method, register_method
from cl_core.registry import Registry, package_loader
from cl_core.replay import REPLAY_STRATEGIES, ReplayStrategy, make_replay_strategy, register_replay_strategy
from cl_core.replay.reservoir import ReservoirReplay
from cl_core.store.priorities import PRIORITY_FUNCTIONS, PriorityFunction, get_priority_function, register


@pytest.fixture
def scratch_registries(monkeypatch: pytest.MonkeyPatch) -> None:
    """Registrations made by a test are dropped afterwards (the registries are process-wide)."""
    for registry in (METHODS, REPLAY_STRATEGIES, PRIORITY_FUNCTIONS):
        registry.names()  # load the built-ins first, so the copy holds them
        monkeypatch.setattr(registry, "_entries", dict(registry._entries))


def test_every_extension_point_is_a_registry_holding_its_builtins() -> None:
    assert set(METHODS) == {"none", "replay", "ewc", "l2", "packnet", "progressive", "olora", "neighbourhood"}
    assert set(REPLAY_STRATEGIES) == {"random", "priority", "herding", "gradient"}
    assert set(PRIORITY_FUNCTIONS) == {"loss", "uncertainty", "recency", "reward"}
    assert {"task_id", "embedding", "learned"} <= set(ROUTERS)
    for registry in (METHODS, REPLAY_STRATEGIES, PRIORITY_FUNCTIONS, ROUTERS):
        assert isinstance(registry, Registry)
        assert registry.names() == sorted(registry.names())
        for name, entry in registry.items():
            assert entry.name == name  # classes learn the name they are registered under


def test_per_task_blocks_is_declared_by_the_block_methods_only() -> None:
    blocks = {name for name, cls in METHODS.items() if cls.per_task_blocks}
    assert blocks == {"packnet", "progressive", "olora"}
    for name in METHODS:
        expected = 3 if name in blocks else 1
        assert make_method(name, MethodSettings(max_tasks=3)).rank_blocks() == expected, name


@pytest.mark.parametrize(("lookup", "what"), [
    (lambda: make_method("magic", MethodSettings()), "unknown anti-forgetting method 'magic'; known: ewc, l2"),
    (lambda: make_replay_strategy("best", 4), "unknown replay strategy 'best'; known: gradient, herding"),
    (lambda: get_priority_function("vibes"), "unknown priority function 'vibes'; known: loss, recency"),
    (lambda: make_replay_strategy(["random"], 4), "unknown replay strategy \\['random'\\]"),
])
def test_unknown_names_list_the_known_ones(lookup, what: str) -> None:
    with pytest.raises(InvalidInputError, match=what):
        lookup()


def test_a_name_taken_by_another_class_is_refused(scratch_registries: None) -> None:
    with pytest.raises(InvalidInputError, match="anti-forgetting method 'ewc' is already registered"):
        @register_method("ewc")
        class Other(AntiForgettingMethod):
            pass
    with pytest.raises(InvalidInputError, match="replay strategy 'random' is already registered"):
        @register_replay_strategy("random")
        class OtherReplay(ReservoirReplay):
            pass
    with pytest.raises(InvalidInputError, match="priority function 'loss' is already registered"):
        @register
        class OtherLoss(PriorityFunction):
            name = "loss"
    assert METHODS.get("ewc").__module__ == "cl_core.methods.ewc"  # the built-in kept its name


@pytest.mark.parametrize("bad", ["", "  ", None, 3])
def test_bad_names_are_refused_when_registering(bad: object) -> None:
    with pytest.raises(InvalidInputError, match="name must be a non-empty string"):
        register_method(bad)  # type: ignore[arg-type]


def test_decorators_check_what_they_register(scratch_registries: None) -> None:
    with pytest.raises(InvalidInputError, match="decorates AntiForgettingMethod subclasses"):
        register_method("toy")(dict)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="decorates ReplayStrategy subclasses"):
        register_replay_strategy("toy")(dict)  # type: ignore[arg-type]
    with pytest.raises(InvalidInputError, match="needs a non-empty `name`"):
        register(type("Nameless", (PriorityFunction,), {}))
    assert "toy" not in METHODS and "toy" not in REPLAY_STRATEGIES


def test_a_new_method_is_one_class_and_the_config_accepts_it(scratch_registries: None) -> None:
    with pytest.raises(ConfigError, match="anti_forgetting='toy'"):
        ContinualConfig(anti_forgetting="toy")

    @register_method("toy")
    class Toy(AntiForgettingMethod):
        per_task_blocks = True

    config = ContinualConfig(anti_forgetting=["toy", "replay"], lora_rank=4, max_tasks=3)
    assert (config.rank_blocks, config.adapter_rank) == (3, 12)
    assert make_method("toy", MethodSettings(max_tasks=3)).rank_blocks() == 3
    # the "one per-task block method" rule and the rank limit follow the attribute, not a list of names
    with pytest.raises(ConfigError, match="toy and olora each split the adapter"):
        ContinualConfig(anti_forgetting=["toy", "olora"])
    with pytest.raises(ConfigError, match="max_tasks.*512"):
        ContinualConfig(anti_forgetting="toy", lora_rank=256, max_tasks=4)


def test_a_method_that_sizes_the_adapter_itself_counts_as_a_block_method(scratch_registries: None) -> None:
    class Sized(AntiForgettingMethod):
        def rank_blocks(self) -> int:
            return self.settings.max_tasks

    class Declared(Sized):
        per_task_blocks = False

    assert Sized.per_task_blocks is True
    assert Declared.per_task_blocks is False  # an explicit declaration wins
    assert AntiForgettingMethod.per_task_blocks is False


def test_a_new_replay_strategy_and_priority_function_are_accepted_by_the_config(scratch_registries: None) -> None:
    for field, value in (("replay_strategy", "newest"), ("priority_function", "length")):
        with pytest.raises(ConfigError, match=f"{field}='{value}'"):
            ContinualConfig(**{field: value})

    @register_replay_strategy("newest")
    class Newest(ReservoirReplay):
        pass

    @register
    class Length(PriorityFunction):
        name = "length"

        def initial(self, **_: object) -> float:
            return 1.0

    assert issubclass(REPLAY_STRATEGIES.get("newest"), ReplayStrategy)
    config = ContinualConfig(replay_strategy="newest", priority_function="length")
    assert (config.replay_strategy, config.priority_function) == ("newest", "length")
    assert isinstance(make_replay_strategy("newest", 4), Newest)
    assert isinstance(get_priority_function("length"), Length)


def _write_package(root: Path, name: str, modules: dict[str, str]) -> None:
    package = root / name
    package.mkdir()
    (package / "__init__.py").write_text("")
    for module, source in modules.items():
        (package / f"{module}.py").write_text(textwrap.dedent(source))


def test_package_loader_registers_every_module_of_a_package(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Dropping a file into the package is all it takes: no import list to edit."""
    registry: Registry[type] = Registry("widget", loader=package_loader("cl_widgets_ok"))
    monkeypatch.setitem(sys.modules, "widget_registry", type(sys)("widget_registry"))
    sys.modules["widget_registry"].WIDGETS = registry  # type: ignore[attr-defined]
    _write_package(tmp_path, "cl_widgets_ok", {
        "alpha": "from widget_registry import WIDGETS\n@WIDGETS.register('alpha')\nclass Alpha: pass\n",
        "beta": "from widget_registry import WIDGETS\n@WIDGETS.register('beta')\nclass Beta: pass\n",
        "_private": "raise RuntimeError('modules starting with _ are not imported')\n",
    })
    monkeypatch.syspath_prepend(str(tmp_path))
    assert registry.names() == ["alpha", "beta"]
    assert registry.get("beta").name == "beta"
    with pytest.raises(InvalidInputError, match="unknown widget 'gamma'; known: alpha, beta"):
        registry.get("gamma")


def test_a_module_that_fails_to_import_fails_every_lookup(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Never a silently shorter list of names: the import error comes back on the next lookup too."""
    registry: Registry[type] = Registry("gadget", loader=package_loader("cl_gadgets_broken"))
    _write_package(tmp_path, "cl_gadgets_broken", {"broken": "import a_module_that_does_not_exist\n"})
    monkeypatch.syspath_prepend(str(tmp_path))
    for _ in range(2):
        with pytest.raises(ModuleNotFoundError, match="a_module_that_does_not_exist"):
            registry.names()
