"""Plugin discovery and the registries built from it.

The plugin manager is created by :func:`load_plugins` (called from :func:`bloombee_core.build`), never
at import time. Entry points of the ``bloombee`` group are imported one by one: a plugin whose import
or hook fails is reported by name and skipped, or raises in strict mode. Two plugins claiming one
name in the same kind always fail, naming both.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import logging
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import pluggy
from pydantic import ValidationError

from bloombee_core import hookspecs
from bloombee_core.errors import ConfigError, PluginError, dotted
from bloombee_core.plugin import Plugin

if TYPE_CHECKING:
    from transformers import PretrainedConfig

    from bloombee_core.family import ModelFamily
    from bloombee_core.settings import PluginChoice

logger = logging.getLogger("bloombee")

ENTRY_POINT_GROUP = "bloombee"


@dataclass(frozen=True)
class Kind:
    """One extension kind: its hook, its base class (imported lazily) and how to name one of it."""

    name: str
    hook: str
    base: str  # "module:Class"
    noun: str

    def base_class(self) -> type:
        module, _, cls = self.base.partition(":")
        return getattr(importlib.import_module(module), cls)


KINDS: dict[str, Kind] = {
    k.name: k
    for k in (
        Kind(
            "model_families",
            "bloombee_register_model_families",
            "bloombee_core.family:ModelFamily",
            "model family",
        ),
        Kind("transports", "bloombee_register_transports", "bloombee_core.transport:Transport", "transport"),
        Kind(
            "compressors",
            "bloombee_register_compressors",
            "bloombee_core.compression:Compressor",
            "compressor",
        ),
        Kind(
            "offload_policies",
            "bloombee_register_offload_policies",
            "bloombee_core.offload:OffloadPolicy",
            "offload policy",
        ),
        Kind(
            "decoding_strategies",
            "bloombee_register_decoding_strategies",
            "bloombee_core.decoding:DecodingStrategy",
            "decoding strategy",
        ),
        Kind("drafters", "bloombee_register_drafters", "bloombee_core.drafting:Drafter", "drafter"),
        Kind(
            "tuning_methods",
            "bloombee_register_tuning_methods",
            "bloombee_core.tuning:TuningMethod",
            "tuning method",
        ),
    )
}


@dataclass(frozen=True)
class PluginInfo:
    """Where one registered plugin class came from."""

    kind: str
    name: str
    cls: type[Plugin]
    source: str  # entry-point name, or the module of a plugin object passed in directly
    distribution: str | None
    version: str | None

    @property
    def origin(self) -> str:
        dist = f"{self.distribution} {self.version}" if self.distribution else "passed in directly"
        return f"{self.cls.__module__}.{self.cls.__qualname__} ({dist})"


@dataclass(frozen=True)
class PluginFailure:
    """A plugin that was skipped because importing it or calling its hook raised."""

    source: str
    distribution: str | None
    error: str


@dataclass
class PluginSet:
    """The registries: every kind's plugins by name, and the plugins that failed to load."""

    plugins: dict[str, dict[str, PluginInfo]] = field(default_factory=lambda: {k: {} for k in KINDS})
    failures: list[PluginFailure] = field(default_factory=list)

    def classes(self, kind: str) -> dict[str, type]:
        return {name: info.cls for name, info in self._kind(kind).items()}

    def get(self, kind: str, name: str, key: str = "") -> type:
        """The plugin class called ``name``; an unknown name lists the installed ones."""
        known = self._kind(kind)
        if name not in known:
            installed = ", ".join(sorted(known)) or "none"
            raise ConfigError(key, f"unknown {KINDS[kind].noun} {name!r}; installed: {installed}")
        return known[name].cls

    def create(self, kind: str, choice: str | Mapping[str, Any] | PluginChoice, key: str = "") -> Any:
        """Instantiate a plugin from a name or ``{"name": ..., **options}``, validating its options."""
        if isinstance(choice, str):
            name, options = choice, {}
        elif isinstance(choice, Mapping):
            options = dict(choice)
            name = options.pop("name", None)
        else:  # a settings PluginChoice
            name, options = choice.name, choice.options()
        if not name:
            raise ConfigError(key, f'choose a {KINDS[kind].noun} with name = "..."')
        cls = self.get(kind, name, f"{key}.name" if key else "name")
        try:
            validated = cls.Options.model_validate(options)
        except ValidationError as exc:
            raise ConfigError(*_first_error(exc, key)) from None
        return cls(validated)

    def instances_without_options(self, kind: str) -> dict[str, Plugin]:
        """One instance of every plugin of ``kind`` that works without options, by name: e.g. every
        compressor a peer can decode. Plugins whose options have no defaults are left out."""
        out: dict[str, Plugin] = {}
        for name, cls in self.classes(kind).items():
            try:
                out[name] = cls()
            except Exception:  # noqa: BLE001 - needs options: usable only where chosen with them
                continue
        return out

    def family_for(self, config: PretrainedConfig, name: str | None = None) -> ModelFamily:
        """The model-family adapter serving ``config.model_type`` (or the family called ``name``)."""
        if name:
            return self.create("model_families", name, "model.family")
        model_type = getattr(config, "model_type", None)
        for family in self.classes("model_families").values():
            if model_type in family.model_types:
                return family()
        served = sorted(t for f in self.classes("model_families").values() for t in f.model_types)
        raise ConfigError(
            "model.path",
            f"no installed model family serves model_type {model_type!r}; "
            f"served: {', '.join(served) or 'none'} (install a bloombee-plugin-* package that adds it)",
        )

    def _kind(self, kind: str) -> dict[str, PluginInfo]:
        if kind not in KINDS:
            raise KeyError(f"unknown plugin kind {kind!r}; kinds: {', '.join(KINDS)}")
        return self.plugins[kind]


def _first_error(exc: ValidationError, prefix: str) -> tuple[str, str]:
    err = exc.errors()[0]
    key = dotted([prefix, *err["loc"]] if prefix else err["loc"])
    if err["type"] == "extra_forbidden":
        return key, "unknown option"
    return key, f"{err['msg']} (got {err.get('input')!r})"


def load_plugins(
    *, strict: bool = False, extra: Iterable[object] = (), entry_points: bool = True
) -> PluginSet:
    """Discover plugins and build the registries.

    :param strict: raise :class:`PluginError` instead of skipping a plugin that fails to load.
    :param extra: plugin objects (modules or instances with hook implementations) registered beside the
        installed ones — how tests pass their own plugins instead of patching globals.
    :param entry_points: also load the installed ``bloombee`` entry points.
    """
    pm = pluggy.PluginManager(hookspecs.PROJECT)
    pm.add_hookspecs(hookspecs)
    result = PluginSet()
    origins: dict[str, tuple[str, str | None, str | None]] = {}

    def fail(source: str, dist: str | None, error: BaseException) -> None:
        message = f"{type(error).__name__}: {error}"
        if strict:
            raise PluginError(
                f"plugin {source!r} ({dist or 'passed in directly'}) failed: {message}"
            ) from error
        logger.warning(
            "plugin %r (%s) failed and was skipped: %s", source, dist or "passed in directly", message
        )
        result.failures.append(PluginFailure(source, dist, message))

    if entry_points:
        for ep in sorted(importlib.metadata.entry_points(group=ENTRY_POINT_GROUP), key=lambda e: e.name):
            dist = ep.dist.name if ep.dist else None
            version = ep.dist.version if ep.dist else None
            try:
                obj = ep.load()
                pm.register(obj, name=ep.name)
            except Exception as exc:  # a broken third-party plugin must not crash the host
                fail(ep.name, dist, exc)
                continue
            origins[ep.name] = (ep.name, dist, version)
    for obj in extra:
        source = getattr(obj, "__name__", type(obj).__name__)
        try:
            name = pm.register(obj)
        except Exception as exc:
            fail(source, None, exc)
            continue
        origins[name] = (source, None, None)

    _reject_unknown_hooks(pm, origins, fail)
    for kind in KINDS.values():
        base = kind.base_class()
        for impl in getattr(pm.hook, kind.hook).get_hookimpls():
            source, dist, version = origins[impl.plugin_name]
            try:
                classes = list(impl.function() or ())
                for cls in classes:
                    _check_class(cls, base, kind)
            except Exception as exc:
                fail(source, dist, exc)
                continue
            for cls in classes:
                info = PluginInfo(kind.name, cls.name, cls, source, dist, version)
                clash = result.plugins[kind.name].get(cls.name)
                if clash is not None:
                    raise PluginError(
                        f"two plugins claim the {kind.noun} name {cls.name!r}: "
                        f"{clash.origin} and {info.origin}; uninstall one of them"
                    )
                result.plugins[kind.name][cls.name] = info
    return result


def _check_class(cls: object, base: type, kind: Kind) -> None:
    if not (isinstance(cls, type) and issubclass(cls, base)):
        raise TypeError(f"{kind.hook} returned {cls!r}, which is not a subclass of {base.__qualname__}")
    name = getattr(cls, "name", None)
    if not isinstance(name, str) or not name:
        raise TypeError(f"{cls.__qualname__} has no `name` (a non-empty string)")


def _reject_unknown_hooks(
    pm: pluggy.PluginManager,
    origins: dict[str, tuple],
    fail: Callable[[str, str | None, BaseException], None],
) -> None:
    """Like ``pm.check_pending()``, but a misnamed hook only takes down its own plugin."""
    for hook_name in list(vars(pm.hook)):
        if hook_name.startswith("_"):
            continue
        caller = getattr(pm.hook, hook_name)
        if caller.has_spec():
            continue
        for impl in caller.get_hookimpls():
            if impl.optionalhook:
                continue
            source, dist, _ = origins[impl.plugin_name]
            pm.unregister(impl.plugin)
            known = ", ".join(kind.hook for kind in KINDS.values())
            fail(source, dist, PluginError(f"hook {hook_name!r} matches no hook spec; known hooks: {known}"))
