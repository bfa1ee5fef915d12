"""Every user-facing setting, in one table built from the engine's own dataclasses.

:class:`~lminf_integrations.config.EngineOptions`, :class:`~lminf_integrations.config.LMInfiniteConfig` and
:class:`~lminf_integrations.config.GenerationSettings` declare each setting once (name, type, default, help,
aliases). :data:`SETTINGS` reads them, and everything that takes settings by name is built from it: the fields of
the LangChain and LlamaIndex classes (:mod:`lminf_integrations.adapter_base`), the options of ``lminf``, the
per-call options of both frameworks, and the class docstrings' settings lists. A setting added to a dataclass
appears in every entry point, spelled the same. Imports nothing heavy (the CLI builds its parser from this).
"""

from __future__ import annotations

import difflib
import textwrap
import typing
from collections.abc import Iterable, Mapping
from dataclasses import Field, dataclass, fields
from typing import Any

from .config import DCAConfig, EngineOptions, GenerationSettings, LMInfiniteConfig, XL3MConfig, merge_stop

#: Groups, in the order they are listed: which model and how it loads; the long-context strategy; how a prompt is
#: encoded (every strategy); each strategy's own settings; how decoding runs; one answer (these may also be given
#: per call); what is shown while working.
GROUPS = ("model", "strategy", "encoding", "attention", "xl3m", "dca", "decoding", "generation", "display")
#: Groups an already-built engine fixes: given together with ``engine=``, they are refused.
ENGINE_GROUPS = ("model", "strategy", "encoding", "attention", "xl3m", "dca", "decoding")
#: Groups that belong to one strategy: given (not at their defaults) with another, they are refused.
STRATEGY_GROUPS = {"attention": "lm-infinite", "xl3m": "xl3m", "dca": "dca"}


@dataclass(frozen=True)
class Setting:
    """One setting: its one name (``--name-with-dashes`` on the command line), type, default, help, aliases."""

    name: str
    annotation: Any
    default: Any
    help: str
    group: str
    aliases: tuple[str, ...] = ()
    field: str = ""  # the dataclass field it sets, when not named like it

    @property
    def field_name(self) -> str:
        return self.field or self.name

    @property
    def per_call(self) -> bool:
        return self.group == "generation"

    @property
    def flags(self) -> tuple[str, ...]:
        return tuple("--" + name.replace("_", "-") for name in (self.name, *self.aliases))


def setting_name(f: Field[Any]) -> str:
    """The setting a dataclass field declares (its own name unless the declaration renames it)."""
    return f.metadata.get("name") or f.name


def _declared(cls: type, group: str) -> tuple[Setting, ...]:
    hints = typing.get_type_hints(cls)
    return tuple(
        Setting(
            setting_name(f),
            hints[f.name],
            f.default,
            f.metadata["help"],
            f.metadata["group"] or group,
            f.metadata["aliases"],
            "" if setting_name(f) == f.name else f.name,
        )
        for f in fields(cls)
    )


PROGRESS = Setting(
    "progress",
    bool | None,
    None,
    "show a progress bar on stderr while a long prompt is encoded; None: only when stderr is a terminal",
    "display",
)

SETTINGS: tuple[Setting, ...] = (
    *_declared(EngineOptions, "model"),
    *_declared(LMInfiniteConfig, "attention"),
    *_declared(XL3MConfig, "xl3m"),
    *_declared(DCAConfig, "dca"),
    *_declared(GenerationSettings, "generation"),
    PROGRESS,
)
BY_NAME = {setting.name: setting for setting in SETTINGS}
_ALIASES = {alias: setting.name for setting in SETTINGS for alias in setting.aliases}


def in_groups(*groups: str) -> tuple[Setting, ...]:
    return tuple(setting for setting in SETTINGS if setting.group in groups)


@dataclass(frozen=True)
class Resolved:
    """A full set of settings, validated: the engine's dataclasses and the display choice."""

    options: EngineOptions
    config: LMInfiniteConfig
    xl3m: XL3MConfig
    dca: DCAConfig
    generation: GenerationSettings
    progress: bool | None


def resolve(values: Mapping[str, Any], refuse_switched_off: bool = True) -> Resolved:
    """The settings named in ``values`` (canonical names), defaults for the rest; ``ValueError`` on bad values, and
    (``refuse_switched_off``) on a setting another one switches off (:func:`switched_off`): off for values read
    from an engine built directly from the dataclasses, which do not apply that rule."""

    def pick(cls: type) -> dict[str, Any]:
        return {f.name: values[setting_name(f)] for f in fields(cls) if setting_name(f) in values}

    progress = values.get("progress")
    if progress is not None and not isinstance(progress, bool):
        raise ValueError("progress must be True, False or None")
    resolved = Resolved(
        EngineOptions(**pick(EngineOptions)),
        LMInfiniteConfig(**pick(LMInfiniteConfig)),
        XL3MConfig(**pick(XL3MConfig)),
        DCAConfig(**pick(DCAConfig)),
        GenerationSettings(**pick(GenerationSettings)),
        progress,
    )
    strategy = resolved.options.strategy
    for group, owner in STRATEGY_GROUPS.items():
        changed = [
            f"{s.name}={values[s.name]!r}" for s in in_groups(group) if values.get(s.name, s.default) != s.default
        ]
        if changed and strategy != owner:
            raise ValueError(
                f"{', '.join(changed)}: settings of strategy={owner!r} have no effect with strategy={strategy!r}; "
                "leave them out"
            )
    unused = switched_off(resolved) if refuse_switched_off else {}
    for name, because in unused.items():
        if values.get(name, BY_NAME[name].default) != BY_NAME[name].default:
            raise ValueError(f"{name}={values[name]!r} has no effect with {because}; leave it out")
    return resolved


def switched_off(resolved: Resolved) -> dict[str, str]:
    """Settings that do nothing with the others as they are, each with the settings that switch it off.

    Refused when given (:func:`resolve`), as a setting of another strategy is, so that no run looks as if it had
    used them. Not in the dataclasses' own checks: there a default may be switched off (``hop_margin`` with
    ``passage_tokens=None``), and a comparison may share one config among strategies and variants.
    """
    config, xl3m = resolved.config, resolved.xl3m
    off: dict[str, str] = {}
    if config.top_k == 0:
        off["top_k_from_layer"] = "top_k=0"
        if config.n_global == 0:  # the distance limit places global and top-k keys only
            off["distance_limit"] = "n_global=0 and top_k=0"
    if config.cache_mode == "full":  # only the window cache's decoding steps keep their shapes
        off["compile_decode"] = "cache_mode='full'"
    if xl3m.passage_tokens is None:  # no passages: none to keep by margin, and no hop from the best one
        off["passage_margin"] = off["hop_margin"] = off["hop_confidence"] = "passage_tokens=None"
    elif xl3m.hop_margin is None:
        off["hop_confidence"] = "hop_margin=None"
    return off


def canonical(values: Mapping[str, Any], known: Iterable[str], owner: str) -> dict[str, Any]:
    """``values`` with aliases renamed to the settings' names.

    Raises:
        ValueError: for a name that is neither in ``known`` nor an alias (naming the closest), or a setting given
            under two names at once.
    """
    out: dict[str, Any] = {}
    spelt: dict[str, str] = {}
    for name, value in values.items():
        real = _ALIASES.get(name, name)
        if real in out:
            raise ValueError(f"{owner}: pass {spelt[real]} or {name}, not both (they are one setting)")
        out[real], spelt[real] = value, name
    refuse_unknown(out, [*known, *_ALIASES], owner)
    return out


def for_call(
    base: GenerationSettings, overrides: Mapping[str, Any], owner: str, strict: bool = True
) -> GenerationSettings:
    """``base`` with a call's keyword arguments applied: generation settings (or their aliases) only; a call's
    ``stop`` (a string or a list) adds to ``base.stop``.

    Raises:
        TypeError: with ``strict``, for any other keyword (silently ignoring, say, ``tools=`` would make an answer
            look as if the model had seen them).
    """
    per_call = in_groups("generation")
    given = canonical({k: v for k, v in overrides.items() if k in _ALIASES or k in BY_NAME}, BY_NAME, owner)
    others = sorted(set(overrides) - set(_ALIASES) - set(BY_NAME)) + sorted(
        name for name in given if not BY_NAME[name].per_call
    )
    if strict and others:
        accepted = sorted(name for setting in per_call for name in (setting.name, *setting.aliases))
        raise TypeError(
            f"{owner} does not take {', '.join(others)} per call; per-call options are {', '.join(accepted)} (this "
            "local model has no tool calling or structured output; model settings are fixed when it is built)"
        )
    values = {s.name: given.get(s.name, getattr(base, s.name)) for s in per_call}
    values["stop"] = tuple(merge_stop(base.stop, given.get("stop")))
    return GenerationSettings(**values)


def refuse_unknown(given: Iterable[str], known: Iterable[str], owner: str) -> None:
    """Raise ``ValueError`` naming every unknown setting, the closest known one, and all known settings.

    A misspelt setting (``n_locl=5``) must fail loudly and say what was meant, never build an object with the
    default silently in its place.
    """
    names = sorted({name for name in known if not name.startswith("_")})
    unknown = sorted(set(given) - set(names))
    if not unknown:
        return
    hints = []
    for name in unknown:
        close = difflib.get_close_matches(name, names, n=1)
        hints.append(f"{name!r} (did you mean {close[0]!r}?)" if close else repr(name))
    raise ValueError(f"{owner} got unknown settings: {', '.join(hints)}; known settings: {', '.join(names)}")


def describe(groups: Iterable[str] = GROUPS, indent: str = "        ") -> str:
    """The settings of ``groups`` as docstring lines: ``name (aliases): type = default`` then the help."""
    lines = []
    for setting in in_groups(*groups):
        also = f" (or {', '.join(setting.aliases)})" if setting.aliases else ""
        lines.append(f"{indent}{setting.name}{also}: {type_name(setting.annotation)} = {setting.default!r}")
        lines.extend(
            textwrap.wrap(
                setting.help + ".",
                100,
                break_on_hyphens=False,
                initial_indent=indent + "    ",
                subsequent_indent=indent + "    ",
            )
        )
    return "\n".join(lines)


def type_name(annotation: Any) -> str:
    """How a setting's type reads in documentation: ``'window' | 'full'``, ``list[str]``, ``int | None``."""
    if typing.get_origin(annotation) is typing.Literal:
        return " | ".join(repr(choice) for choice in typing.get_args(annotation))
    if typing.get_origin(annotation) is tuple:
        return "list[str]"
    return getattr(annotation, "__name__", None) or str(annotation)


def markdown_table() -> str:
    """Every setting as a README table (a test keeps README's copy equal to this)."""
    rows = ["| setting | `lminf` option | default | meaning |", "|---|---|---|---|"]
    for setting in SETTINGS:
        name = " / ".join(f"`{name}`" for name in (setting.name, *setting.aliases))
        flags = " / ".join(f"`{flag}`" for flag in setting.flags)
        if setting.annotation == bool | None:  # --progress / --no-progress
            flags += f" / `--no-{setting.flags[0][2:]}`"
        default = "`()`" if setting.default == () else f"`{setting.default!r}`"
        per_call = " (also per call)" if setting.per_call else ""
        rows.append(f"| {name} | {flags} | {default} | {setting.help}{per_call} |")
    return "\n".join(rows)
